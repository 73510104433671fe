"""Instance: a Lambda Cloud instance as a Pulumi dynamic resource (public API v1 through LambdaClient).

Lambda launches an instance with everything fixed: type, region, SSH key, filesystems, user data. Only the name
can change afterwards (POST /api/v1/instances/{id}), so every other change replaces the instance, old one first:
never two trainers on one filesystem, and the retry-safe create would otherwise adopt the old instance by name.

The instance is found again by its name (`lorastack-<stack>`, unique per stack): after a launch whose answer was
lost (infra/lambda_backend/provider.py), and from inside, where the trainer looks itself up by that name to
terminate itself (Lambda gives an instance no id of its own; cloudapi/hosts.py LambdaHost).

An instance that ended (the trainer terminated it, or Lambda lost it) is gone at the next refresh; `pulumi up`
then launches a new one, which resumes from the checkpoints on the filesystem.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, ReadResult, UpdateResult
from pulumi.dynamic.dynamic import PROVIDER_KEY

from cloudapi.lambda_rest import GONE_STATUSES, INSUFFICIENT_CAPACITY, LambdaClient, LambdaError, NotFound
from infra.dynamic import is_unknown
from infra.lambda_backend import catalog, reap
from infra.lambda_backend.provider import LambdaProvider
from infra.lambda_backend.user_data import MAX_BYTES

INSTANCE_REPLACE_KEYS = ("instanceTypeName", "regionName", "sshKeyNames", "fileSystemNames", "userData", "tags")
INSTANCE_UPDATE_KEYS = ("name",)
_TAG_KEY = re.compile(r"^[a-z][a-z0-9-:]+$")


class InstanceProvider(LambdaProvider):
    """Inputs: name, instanceTypeName, regionName, sshKeyNames, fileSystemNames, userData (secret), tags.
    Outputs add instanceId, status, ip, usdPerHour (as of the last create, update or refresh)."""

    replace_keys, update_keys = INSTANCE_REPLACE_KEYS, INSTANCE_UPDATE_KEYS

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures: list[CheckFailure] = []

        def fail(key: str, reason: str) -> None:
            failures.append(CheckFailure(key, reason))

        known = {key: value for key, value in news.items() if not is_unknown(value)}
        name = known.get("name")
        if "name" in known and not (isinstance(name, str) and 0 < len(name) <= 64):
            fail("name", f"an instance needs a name of 1 to 64 characters (got {name!r})")
        if "instanceTypeName" in known and known["instanceTypeName"] not in catalog.LAMBDA_INSTANCE_TYPES:
            fail("instanceTypeName", f"unknown Lambda instance type {known['instanceTypeName']!r}; allowed: "
                 + ", ".join(sorted(catalog.LAMBDA_INSTANCE_TYPES)))
        if "regionName" in known and known["regionName"] not in catalog.LAMBDA_REGIONS:
            fail("regionName", f"unknown Lambda region {known['regionName']!r}; allowed: {', '.join(catalog.LAMBDA_REGIONS)}")
        keys = known.get("sshKeyNames")
        if "sshKeyNames" in known and not (isinstance(keys, list) and len(keys) == 1 and isinstance(keys[0], str)):
            fail("sshKeyNames", f"Lambda launches take exactly one SSH key name (got {keys!r})")
        systems = known.get("fileSystemNames", [])
        if not (isinstance(systems, list) and len(systems) <= 1):
            fail("fileSystemNames", f"at most one filesystem, the run's workspace (got {systems!r})")
        user_data = known.get("userData")
        if "userData" in known and not (isinstance(user_data, str) and user_data.startswith("#cloud-config")):
            fail("userData", "must be a #cloud-config document")  # never echoed: it holds the API key
        elif isinstance(user_data, str) and len(user_data.encode()) > MAX_BYTES:
            fail("userData", f"is {len(user_data.encode())} bytes; Lambda takes at most {MAX_BYTES}")
        for tag in known.get("tags", []):
            if not (isinstance(tag, dict) and _TAG_KEY.match(str(tag.get("key", ""))) and len(tag["key"]) <= 55
                    and isinstance(tag.get("value"), str) and len(tag["value"]) <= 128):
                fail("tags", f"a tag is {{key: [a-z][a-z0-9-:]+ (55 at most), value: 128 characters at most}}; got {tag!r}")
        return CheckResult(news, failures)

    def create(self, props: dict[str, Any]) -> CreateResult:
        def find(client: LambdaClient) -> dict | None:
            # this create's own instance from an earlier try: same name, region and type, not on its way out
            return next((instance for instance in client.list_instances() if _same_instance(instance, props)), None)

        def launch(client: LambdaClient) -> dict:
            try:
                (instance_id,) = client.launch(_launch_body(props))
            except LambdaError as error:
                if error.code == INSUFFICIENT_CAPACITY:
                    raise RuntimeError(_no_capacity(self.client(), props)) from None
                raise
            return self._launched(instance_id)

        instance = self.create_once(find, launch)
        return CreateResult(instance["id"], _outputs(props, instance))

    def _launched(self, instance_id: str) -> dict:
        """The instance a launch just answered with; a moment may pass before the API lists it."""
        client, deadline = self.client(), time.monotonic() + 2 * self.timeout
        while True:
            try:
                return client.get_instance(instance_id)
            except NotFound:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(min(self.backoff * 2, 2.0))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        try:
            instance = self.client().get_instance(id_)
        except NotFound:
            return ReadResult("", {})
        if instance["status"] in GONE_STATUSES:
            return ReadResult("", {})  # ended (the trainer terminated it, or Lambda lost it): the engine drops it
        return ReadResult(id_, _outputs({**props, "name": instance.get("name", props.get("name"))}, instance))

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        client = self.client()
        try:
            instance = client.rename_instance(id_, news["name"]) if olds.get("name") != news["name"] else client.get_instance(id_)
        except NotFound:
            raise RuntimeError(f"instance {id_} ({news['name']}) no longer exists on Lambda Cloud; run `pulumi refresh`, "
                               "then `pulumi up` launches it again") from None
        return UpdateResult(_outputs(news, instance))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        self.client().terminate_if_present(id_)  # Lambda bills until terminate: this is what ends the bill


def _same_instance(instance: dict, props: dict[str, Any]) -> bool:
    return (instance.get("name") == props["name"] and instance["status"] not in GONE_STATUSES
            and instance["region"]["name"] == props["regionName"]
            and instance["instance_type"]["name"] == props["instanceTypeName"])


def _launch_body(props: dict[str, Any]) -> dict:
    """The launch request. The launch time goes into a tag here, not into the inputs (it would change every
    `pulumi up`): the reaper's only clock, since Lambda's instance list reports no launch time."""
    body: dict[str, Any] = {
        "region_name": props["regionName"],
        "instance_type_name": props["instanceTypeName"],
        "ssh_key_names": list(props["sshKeyNames"]),
        "name": props["name"],
        "user_data": props["userData"],
        "tags": [dict(tag) for tag in props.get("tags") or []] + [reap.launched_at_tag(datetime.now(UTC))],
    }
    if props.get("fileSystemNames"):
        body["file_system_names"] = list(props["fileSystemNames"])
    return body


def _no_capacity(client: LambdaClient, props: dict[str, Any]) -> str:
    kind, region = props["instanceTypeName"], props["regionName"]
    try:
        regions = [r["name"] for r in client.instance_types().get(kind, {}).get("regions_with_capacity_available", [])]
        where = f"regions with capacity now: {', '.join(regions)}" if regions else "no region has capacity now"
    except LambdaError as error:
        where = f"could not list the regions with capacity ({error})"
    return (f"Lambda Cloud has no capacity for {kind} in {region} ({where}). Capacity changes by the minute: "
            "run `pulumi up` again later, or change lorastack:lambda region (the filesystem is region-locked: a new "
            "region means a new, empty filesystem)")


def _outputs(props: dict[str, Any], instance: dict) -> dict[str, Any]:
    inputs = {key: value for key, value in props.items() if key != PROVIDER_KEY}
    return {
        **inputs,
        "instanceId": instance["id"],
        "status": instance["status"],
        "ip": instance.get("ip"),
        "usdPerHour": instance["instance_type"]["price_cents_per_hour"] / 100,
    }


@dataclass
class InstanceArgs:
    name: pulumi.Input[str]
    instance_type_name: pulumi.Input[str]
    region_name: pulumi.Input[str]
    ssh_key_names: pulumi.Input[list[str]]
    user_data: pulumi.Input[str]  # a secret Output: it holds the API key
    file_system_names: pulumi.Input[list[pulumi.Input[str]]] = field(default_factory=list)
    tags: pulumi.Input[list[dict[str, str]]] = field(default_factory=list)


class Instance(pulumi.dynamic.Resource, module="lambda", name="Instance"):
    instanceId: pulumi.Output[str]
    status: pulumi.Output[str]
    ip: pulumi.Output[str]
    usdPerHour: pulumi.Output[float]

    def __init__(self, resource_name: str, args: InstanceArgs, opts: pulumi.ResourceOptions | None = None):
        props = {
            "name": args.name,
            "instanceTypeName": args.instance_type_name,
            "regionName": args.region_name,
            "sshKeyNames": args.ssh_key_names,
            "fileSystemNames": args.file_system_names,
            "userData": args.user_data,
            "tags": args.tags,
            "instanceId": None,
            "status": None,
            "ip": None,
            "usdPerHour": None,
        }
        # The provider host gets plain values, so the user data it returns is marked secret again here.
        fixed = pulumi.ResourceOptions(additional_secret_outputs=["userData"], delete_before_replace=True)
        super().__init__(InstanceProvider(), resource_name, props, pulumi.ResourceOptions.merge(opts, fixed))
