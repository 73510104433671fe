"""Instance: a Vast.ai instance rented from the cheapest matching offer, as a Pulumi dynamic resource.

Create searches offers (POST /api/v0/bundles/: GPU name and count, host reliability, verified hosts, the
`dph_total` ceiling, disk) and accepts the cheapest (PUT /api/v0/asks/{offer}/) with our image, the trainer's
environment, the disk and the label `lorastack-<stack>`. An offer taken meanwhile (404 no_such_ask, 410) moves
on to the next. Vast's creates take no idempotency key, so the PUT is never retried blindly: before every try,
and while a lost answer may still land, the provider lists instances with our label and adopts the one it finds.

Nothing of a Vast instance changes in place but its label (which is the stack's name), so any changed input
replaces it, old one first: one trainer per run prefix in the bucket. An instance whose host went offline
(a lost machine; `pulumi up --refresh` reads it so) is replaced too: the new one resumes from the bucket.
The trainer destroys its own instance when done, so a finished run reads as gone on refresh.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, DiffResult, ReadResult
from pulumi.dynamic.dynamic import PROVIDER_KEY

from cloudapi.retry import RETRY_STATUSES
from cloudapi.vast_rest import NotFound, VastClient, VastError
from contract.spec import ENV_MANAGED
from infra.dynamic import CredentialedProvider, changed_keys, is_unknown, whole_numbers
from infra.vast_backend.catalog import VAST_GPUS
from infra.vast_backend.marks import is_ours

INSTANCE_REPLACE_KEYS = ("label", "image", "gpuName", "gpuCount", "minReliability", "maxUsdPerHour", "diskGb",
                         "verified", "env")
INTEGER_KEYS = ("gpuCount", "diskGb")
LOST_STATUSES = ("offline",)  # the host is gone: the instance will not come back with our disk
OFFERS_PER_SEARCH = 10
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def offer_query(props: dict[str, Any]) -> dict:
    """The offer search (POST /api/v0/bundles/), cheapest first; the disk asked for is priced into dph_total."""
    query: dict[str, Any] = {
        "gpu_name": {"eq": props["gpuName"]},
        "num_gpus": {"eq": props["gpuCount"]},
        "reliability": {"gte": props["minReliability"]},
        "dph_total": {"lte": props["maxUsdPerHour"]},
        "disk_space": {"gte": props["diskGb"]},
        "rentable": {"eq": True},
        "rented": {"eq": False},
        # cheapest first, then by id: two entries also meet the spec's minItems 2 (vast-cli sends any number)
        "order": [["dph_total", "asc"], ["id", "asc"]],
        "type": "on-demand",  # what vast-cli sends (the spec's enum says ondemand; the API takes both)
        "limit": OFFERS_PER_SEARCH,
        "allocated_storage": props["diskGb"],
    }
    if props["verified"]:
        query["verified"] = {"eq": True}
    return query


def create_body(props: dict[str, Any]) -> dict:
    """PUT /api/v0/asks/{id}/: our image with its own entrypoint (runtype args), env as vast-cli sends it (a dict:
    the spec's docker-flag string cannot carry JSON values safely), no restart of a finished container."""
    return {
        "client_id": "me",
        "image": props["image"],
        "label": props["label"],
        "disk": float(props["diskGb"]),
        "env": dict(props["env"]),
        "runtype": "args",
        "target_state": "running",
        "cancel_unavail": True,
    }


class VastProvider(CredentialedProvider):
    """The key: `lorastack:vastApiKey` or VAST_API_KEY (infra.dynamic); the base URL: VAST_URL."""

    credential = "vastApiKey"

    def __init__(self, retries: int = 6, backoff: float = 0.5, timeout: float = 30.0):
        super().__init__()
        self.retries, self.backoff, self.timeout = retries, backoff, timeout

    def client(self, retries: int | None = None) -> VastClient:
        return VastClient(self.credential_value(), retries=self.retries if retries is None else retries,
                          backoff=self.backoff, timeout=self.timeout)


class InstanceProvider(VastProvider):
    """Inputs: label, image, gpuName, gpuCount, minReliability, maxUsdPerHour, diskGb, verified, env. Outputs add
    instanceId, offerId, machineId, dphTotal (what the offer bills per hour) and status (actual_status)."""

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        news = whole_numbers(news, INTEGER_KEYS)
        known = {key: value for key, value in news.items() if not is_unknown(value)}
        failures: list[CheckFailure] = []
        if "gpuName" in known and known["gpuName"] not in VAST_GPUS:
            failures.append(CheckFailure("gpuName", f"unknown Vast.ai gpu_name {known['gpuName']!r}; allowed: "
                                                    + ", ".join(VAST_GPUS)))
        image = known.get("image")
        if image is not None and (not isinstance(image, str) or not _pinned(image)):
            failures.append(CheckFailure("image", f"must be a pinned image (a version tag or @sha256 digest, never "
                                                  f"latest): {image!r}"))
        label = known.get("label")
        if label is not None and not (isinstance(label, str) and 0 < len(label) <= 1024):
            failures.append(CheckFailure("label", "a label is 1 to 1024 characters"))
        env = known.get("env")
        if env is not None:
            if not isinstance(env, dict):
                failures.append(CheckFailure("env", "must be a mapping of variable names to strings"))
            else:
                failures += [CheckFailure("env", f"{name!r}: letters, digits and underscores, not starting with a "
                                                 "digit") for name in env if not _ENV_NAME.match(name)]
                if env.get(ENV_MANAGED) != "1" and not is_unknown(env.get(ENV_MANAGED)):
                    failures.append(CheckFailure("env", f"every lorastack instance carries {ENV_MANAGED}=1 (the reaper's label)"))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        olds, news = whole_numbers(olds, INTEGER_KEYS), whole_numbers(news, INTEGER_KEYS)
        replaces = changed_keys(olds, news, INSTANCE_REPLACE_KEYS)
        if olds.get("status") in LOST_STATUSES:
            replaces.append("status")  # a lost host: a new instance resumes from the bucket
        return DiffResult(changes=bool(replaces), replaces=replaces, delete_before_replace=True)

    def create(self, props: dict[str, Any]) -> CreateResult:
        props = whole_numbers(props, INTEGER_KEYS)
        lookup, once = self.client(), self.client(retries=0)
        for attempt in range(self.retries + 1):
            existing = _find(lookup, props["label"])
            if existing is not None:
                return CreateResult(str(existing["id"]), _outputs(props, existing, None))
            try:
                offer_id, reply = self._rent(lookup, once, props)
            except VastError as error:
                transient = error.status == 0 or error.status in RETRY_STATUSES
                if not transient or attempt == self.retries:
                    raise
                if error.status == 0:  # no answer: the instance may exist already; watch for it
                    landed = self._await_landing(lookup, props["label"])
                    if landed is not None:
                        return CreateResult(str(landed["id"]), _outputs(props, landed, None))
                time.sleep(self.backoff * 2**attempt)
                continue
            instance = lookup.get_instance(reply["new_contract"])
            return CreateResult(str(instance["id"]), _outputs(props, instance, offer_id))
        raise AssertionError("unreachable")

    def _rent(self, lookup: VastClient, once: VastClient, props: dict[str, Any]) -> tuple[int, dict]:
        offers = lookup.search_offers(offer_query(props))
        if not offers:
            raise RuntimeError(
                f"no Vast.ai offer matches {props['gpuCount']}x {props['gpuName']}, reliability >= "
                f"{props['minReliability']}, disk >= {props['diskGb']} GB at <= ${props['maxUsdPerHour']}/h "
                "(lorastack:vast): raise maxUsdPerHour, lower minReliability, or try again later")
        for offer in offers:
            try:
                return offer["id"], once.create_instance(offer["id"], create_body(props))
            except VastError as error:
                if error.status in (404, 410):  # rented by someone else since the search: the next one
                    continue
                raise
        raise RuntimeError(f"every matching Vast.ai offer ({len(offers)}) was taken before we could rent it; run `up` again")

    def _await_landing(self, lookup: VastClient, label: str) -> dict | None:
        deadline = time.monotonic() + 2 * self.timeout
        while time.monotonic() < deadline:
            existing = _find(lookup, label)
            if existing is not None:
                return existing
            time.sleep(min(1.0, max(self.timeout / 10, 0.05)))
        return None

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        try:
            instance = self.client().get_instance(id_)
        except NotFound:
            return ReadResult("", {})  # destroyed (by its trainer when done, or outside Pulumi)
        return ReadResult(id_, _outputs(props, instance, props.get("offerId")))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        self.client().destroy_instance(id_)  # idempotent; destroying is what ends the disk's billing


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and name.rsplit(":", 1)[1] not in ("", "latest")


def _find(client: VastClient, label: str) -> dict | None:
    """This create's own instance from an earlier try: our label and the reaper's mark, not destroyed."""
    return next((instance for instance in client.list_instances(label=label)
                 if instance.get("label") == label and is_ours(instance) and instance.get("cur_state") != "unloaded"),
                None)


def _outputs(props: dict[str, Any], instance: dict, offer_id: int | None) -> dict[str, Any]:
    inputs = {key: value for key, value in props.items() if key != PROVIDER_KEY}
    return {
        **inputs,
        "instanceId": str(instance["id"]),
        "offerId": offer_id,
        "machineId": instance.get("machine_id"),
        "dphTotal": instance.get("dph_total"),
        "status": instance.get("actual_status"),
    }


@dataclass
class InstanceArgs:
    label: pulumi.Input[str]
    image: pulumi.Input[str]
    gpu_name: pulumi.Input[str]
    gpu_count: pulumi.Input[int]
    min_reliability: pulumi.Input[float]
    max_usd_per_hour: pulumi.Input[float]
    disk_gb: pulumi.Input[int]
    verified: pulumi.Input[bool]
    env: pulumi.Input[dict[str, str]]  # a secret Output when it holds a token or the bucket's keys


class Instance(pulumi.dynamic.Resource, module="vast", name="Instance"):
    instanceId: pulumi.Output[str]
    dphTotal: pulumi.Output[float]
    status: pulumi.Output[str]

    def __init__(self, resource_name: str, args: InstanceArgs, opts: pulumi.ResourceOptions | None = None):
        props = {
            "label": args.label, "image": args.image, "gpuName": args.gpu_name, "gpuCount": args.gpu_count,
            "minReliability": args.min_reliability, "maxUsdPerHour": args.max_usd_per_hour, "diskGb": args.disk_gb,
            "verified": args.verified, "env": args.env,
            "instanceId": None, "offerId": None, "machineId": None, "dphTotal": None, "status": None,
        }
        # the provider host takes no secrets, so the env it returns is marked secret again here
        fixed = pulumi.ResourceOptions(additional_secret_outputs=["env"], delete_before_replace=True)
        super().__init__(InstanceProvider(), resource_name, props, pulumi.ResourceOptions.merge(opts, fixed))
