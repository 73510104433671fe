"""Filesystem: a Lambda Cloud persistent filesystem as a Pulumi dynamic resource: the model cache, datasets and
checkpoints, outliving every instance. Region-locked, attachable only at launch, no size (billed per GiB used).

Listed at GET /api/v1/file-systems, created at POST /api/v1/filesystems, deleted at DELETE /api/v1/filesystems/{id}
(the spec's own spellings). Delete answers 400 `filesystems/filesystem-in-use` while an instance still mounts it:
destroy terminates the instance first, and the delete waits for Lambda to release the mount.

Kept filesystems (keepOnDestroy, the default): the component gives them `retain_on_delete`, so `pulumi destroy`
says "retained" and forgets them; a later `pulumi up` adopts the same name in the same region, data intact.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, ReadResult, UpdateResult
from pulumi.dynamic.dynamic import PROVIDER_KEY

from cloudapi.lambda_rest import DUPLICATE, FILESYSTEM_IN_USE, LambdaClient, LambdaError
from infra.dynamic import is_unknown
from infra.lambda_backend import catalog
from infra.lambda_backend.provider import LambdaProvider

FILESYSTEM_REPLACE_KEYS = ("name", "region")
FILESYSTEM_UPDATE_KEYS = ("keepOnDestroy",)  # state only
_NAME = re.compile(r"^[a-zA-Z]+[0-9a-zA-Z-]*$")


class FilesystemProvider(LambdaProvider):
    """Inputs: name, region, keepOnDestroy. Outputs add filesystemId, mountPoint."""

    replace_keys, update_keys = FILESYSTEM_REPLACE_KEYS, FILESYSTEM_UPDATE_KEYS
    release_wait_s = 300.0  # how long a delete waits for a terminated instance to release the mount

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = []
        name, region = news.get("name"), news.get("region")
        if not is_unknown(name) and not (isinstance(name, str) and len(name) <= 60 and _NAME.match(name)):
            failures.append(CheckFailure("name", f"a Lambda filesystem name is a letter, then letters, digits and "
                                                 f"dashes, 60 at most (got {name!r})"))
        if not is_unknown(region) and region not in catalog.LAMBDA_REGIONS:
            allowed = ", ".join(catalog.LAMBDA_REGIONS)
            failures.append(CheckFailure("region", f"unknown Lambda region {region!r}; allowed: {allowed}"))
        if not is_unknown(news.get("keepOnDestroy")) and not isinstance(news.get("keepOnDestroy"), bool):
            failures.append(CheckFailure("keepOnDestroy", "must be true or false"))
        return CheckResult(news, failures)

    def create(self, props: dict[str, Any]) -> CreateResult:
        def find(client: LambdaClient) -> dict | None:
            # same name in the same region: an earlier try of this create, or a filesystem kept on destroy
            return next((fs for fs in client.list_filesystems()
                         if fs["name"] == props["name"] and fs["region"]["name"] == props["region"]), None)

        def post(client: LambdaClient) -> dict:
            try:
                return client.create_filesystem(props["name"], props["region"])
            except LambdaError as error:
                if error.code != DUPLICATE:
                    raise
                elsewhere = next((fs["region"]["name"] for fs in self.client().list_filesystems()
                                  if fs["name"] == props["name"]), "?")
                raise RuntimeError(
                    f"a Lambda filesystem named {props['name']} already exists in {elsewhere} (kept from an earlier "
                    f"region of this stack?); filesystems are region-locked and their names unique: delete it in the "
                    f"Lambda console once its data is safe, or keep lorastack:lambda region at {elsewhere}"
                ) from None

        filesystem = self.create_once(find, post)
        return CreateResult(filesystem["id"], _outputs(props, filesystem))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        filesystem = next((fs for fs in self.client().list_filesystems() if fs["id"] == id_), None)  # no GET by id
        if filesystem is None:
            return ReadResult("", {})
        found = {**props, "name": filesystem["name"], "region": filesystem["region"]["name"]}
        return ReadResult(id_, _outputs(found, filesystem))

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        return UpdateResult({**{key: value for key, value in olds.items() if key != PROVIDER_KEY}, **news,
                             "filesystemId": id_, "mountPoint": olds.get("mountPoint")})

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        if props.get("keepOnDestroy", True):
            return  # kept: the engine forgets it, Lambda keeps it (see the module docstring)
        client, deadline = self.client(), time.monotonic() + self.release_wait_s
        while True:
            try:
                client.delete_filesystem(id_)
                return
            except LambdaError as error:
                if error.code != FILESYSTEM_IN_USE or time.monotonic() >= deadline:
                    raise
            time.sleep(min(self.backoff * 4, 5.0))


def _outputs(props: dict[str, Any], filesystem: dict) -> dict[str, Any]:
    inputs = {key: value for key, value in props.items() if key != PROVIDER_KEY}
    return {**inputs, "filesystemId": filesystem["id"], "mountPoint": filesystem["mount_point"]}


@dataclass
class FilesystemArgs:
    name: pulumi.Input[str]
    region: pulumi.Input[str]
    keep_on_destroy: pulumi.Input[bool] = True


class Filesystem(pulumi.dynamic.Resource, module="lambda", name="Filesystem"):
    filesystemId: pulumi.Output[str]
    name: pulumi.Output[str]
    region: pulumi.Output[str]
    mountPoint: pulumi.Output[str]
    keepOnDestroy: pulumi.Output[bool]

    def __init__(self, resource_name: str, args: FilesystemArgs, opts: pulumi.ResourceOptions | None = None):
        props = {"name": args.name, "region": args.region, "keepOnDestroy": args.keep_on_destroy,
                 "filesystemId": None, "mountPoint": None}
        super().__init__(FilesystemProvider(), resource_name, props, opts)
