"""NetworkVolume: a RunPod network volume as a Pulumi dynamic resource (REST v2 through RunpodClient).

The API key and retry-safe creates: infra/runpod_backend/provider.py.

Kept volumes. A dynamic provider cannot log (its `delete` runs in the provider host, with no engine logger),
so "the volume is kept" is said by the engine: the component gives a kept volume the `retain_on_delete`
resource option, and `pulumi destroy` shows it as retained, drops it from the state and never calls `delete`.
`delete` itself also leaves a volume with `keepOnDestroy: true` alone, for a resource declared without the
option. The option is recorded at `pulumi up`: after changing keepOnDestroy, run `pulumi up` before destroy.
A later `pulumi up` adopts a kept volume again (same name, same data center), datasets and caches intact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    ReadResult,
    UpdateResult,
)
from pulumi.dynamic.dynamic import PROVIDER_KEY

from cloudapi.runpod_rest import NotFound, RunpodClient, RunpodError
from infra.dynamic import is_unknown, whole_numbers
from infra.runpod_backend import catalog
from infra.runpod_backend.provider import RunpodProvider

MIN_VOLUME_GB, MAX_VOLUME_GB = 10, 4096


# --- NetworkVolume ---

VOLUME_REPLACE_KEYS = ("dataCenter",)  # a volume is pinned to its data center
VOLUME_UPDATE_KEYS = ("name", "sizeGb", "keepOnDestroy")  # keepOnDestroy changes state only
VOLUME_INTEGER_KEYS = ("sizeGb", "size")


class NetworkVolumeProvider(RunpodProvider):
    """Inputs: name, sizeGb, dataCenter, keepOnDestroy. Outputs add volumeId and size (what RunPod reports)."""

    replace_keys, update_keys, integer_keys = VOLUME_REPLACE_KEYS, VOLUME_UPDATE_KEYS, VOLUME_INTEGER_KEYS
    release_wait_s = 180.0  # how long a delete waits for a terminated pod to release the volume

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        olds, news = whole_numbers(olds, VOLUME_INTEGER_KEYS), whole_numbers(news, VOLUME_INTEGER_KEYS)
        failures = []
        name, size, data_center = news.get("name"), news.get("sizeGb"), news.get("dataCenter")
        if not is_unknown(name) and not (isinstance(name, str) and name):
            failures.append(CheckFailure("name", "a network volume needs a non-empty name"))
        if not is_unknown(size):
            if not isinstance(size, int) or isinstance(size, bool) or not MIN_VOLUME_GB <= size <= MAX_VOLUME_GB:
                failures.append(CheckFailure(
                    "sizeGb", f"must be a whole number of GB from {MIN_VOLUME_GB} to {MAX_VOLUME_GB} (got {size!r})"
                ))
            elif isinstance(olds.get("sizeGb"), int) and size < olds["sizeGb"] and olds.get("dataCenter") == data_center:
                failures.append(CheckFailure(
                    "sizeGb",
                    f"a RunPod network volume cannot shrink ({olds['sizeGb']} GB -> {size} GB); keep sizeGb at "
                    f"{olds['sizeGb']} or more, or create a new volume under another stack",
                ))
        if not is_unknown(data_center) and data_center not in catalog.RUNPOD_DATA_CENTERS:
            failures.append(CheckFailure(
                "dataCenter",
                f"{data_center!r} is not a data center with network volumes; allowed: {', '.join(catalog.RUNPOD_DATA_CENTERS)}",
            ))
        if not is_unknown(news.get("keepOnDestroy")) and not isinstance(news.get("keepOnDestroy"), bool):
            failures.append(CheckFailure("keepOnDestroy", "must be true or false"))
        return CheckResult(news, failures)

    def create(self, props: dict[str, Any]) -> CreateResult:
        props = whole_numbers(props, VOLUME_INTEGER_KEYS)

        def find(client: RunpodClient) -> dict | None:
            # same name in the same data center: an earlier try of this create, or a volume kept on destroy
            return next(
                (v for v in client.list_volumes() if v["name"] == props["name"] and v["dataCenter"] == props["dataCenter"]),
                None,
            )

        def post(client: RunpodClient) -> dict:
            body = {"name": props["name"], "size": props["sizeGb"], "dataCenter": props["dataCenter"]}
            return client.create_volume(body)

        volume = self.create_once(find, post)
        if volume["size"] < props["sizeGb"]:  # an adopted volume smaller than asked for grows
            volume = self.client().update_volume(volume["id"], {"size": props["sizeGb"]})
        return CreateResult(volume["id"], _volume_outputs(props, volume))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        try:
            volume = self.client().get_volume(id_)
        except NotFound:
            return ReadResult("", {})  # gone: the engine drops it from the state
        props = whole_numbers(props, VOLUME_INTEGER_KEYS)
        return ReadResult(id_, _volume_outputs({**props, "name": volume["name"], "dataCenter": volume["dataCenter"]}, volume))

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        olds, news = whole_numbers(olds, VOLUME_INTEGER_KEYS), whole_numbers(news, VOLUME_INTEGER_KEYS)
        body: dict[str, Any] = {}
        if news["name"] != olds.get("name"):
            body["name"] = news["name"]
        if news["sizeGb"] > olds.get("size", olds.get("sizeGb", 0)):
            body["size"] = news["sizeGb"]
        volume = self.client().update_volume(id_, body) if body else self.client().get_volume(id_)
        return UpdateResult(_volume_outputs(news, volume))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        if props.get("keepOnDestroy", True):
            return  # kept: the engine forgets it, RunPod keeps it (see the module docstring)
        # `destroy` terminates the pod first, but RunPod releases its mount a little later: until then the
        # volume answers 409 (mounted). Wait for the release rather than fail the destroy.
        client, deadline = self.client(), time.monotonic() + self.release_wait_s
        while True:
            try:
                client.delete_volume(id_)
                return
            except RunpodError as error:
                if error.status != 409 or time.monotonic() >= deadline:
                    raise
            time.sleep(min(self.backoff * 4, 5.0))


def _volume_outputs(props: dict[str, Any], volume: dict) -> dict[str, Any]:
    inputs = {key: value for key, value in props.items() if key != PROVIDER_KEY}
    return {**inputs, "volumeId": volume["id"], "size": volume["size"], "type": volume.get("type")}


@dataclass
class NetworkVolumeArgs:
    name: pulumi.Input[str]
    size_gb: pulumi.Input[int]
    data_center: pulumi.Input[str]
    keep_on_destroy: pulumi.Input[bool] = True


class NetworkVolume(pulumi.dynamic.Resource, module="runpod", name="NetworkVolume"):
    volumeId: pulumi.Output[str]
    name: pulumi.Output[str]
    dataCenter: pulumi.Output[str]
    size: pulumi.Output[int]
    keepOnDestroy: pulumi.Output[bool]

    def __init__(self, resource_name: str, args: NetworkVolumeArgs, opts: pulumi.ResourceOptions | None = None):
        props = {
            "name": args.name,
            "sizeGb": args.size_gb,
            "dataCenter": args.data_center,
            "keepOnDestroy": args.keep_on_destroy,
            "volumeId": None,
            "size": None,
            "type": None,
        }
        super().__init__(NetworkVolumeProvider(), resource_name, props, opts)
