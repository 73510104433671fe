"""NetworkVolume: a RunPod network volume as a Pulumi dynamic resource (REST v2 through RunpodClient).

Also home of `RunpodProvider`, the base both RunPod providers share (the Pod provider is in pod.py): how a
provider gets its API key without it ever entering Pulumi state, and how a create is made safe to retry.

The API key. Pulumi pickles the provider object into the state (`__provider`), so the key must never be an
attribute when that happens. The provider reads it in `configure()`, which the dynamic-provider host calls
after unpickling, in its own process, with the whole stack config (secrets decrypted): `lorastack:runpodApiKey`,
or failing that the RUNPOD_API_KEY environment variable. `__getstate__` drops it again should a configured
provider ever be pickled. The base URL is read at call time from RUNPOD_API_BASE_URL.

Kept volumes. A dynamic provider cannot log (its `delete` runs in the provider host, with no engine logger),
so "the volume is kept" is said by the engine: the component gives a kept volume the `retain_on_delete`
resource option, and `pulumi destroy` shows it as retained, drops it from the state and never calls `delete`.
`delete` itself also leaves a volume with `keepOnDestroy: true` alone, for a resource declared without the
option. The option is recorded at `pulumi up`: after changing keepOnDestroy, run `pulumi up` before destroy.
A later `pulumi up` adopts a kept volume again (same name, same data center), datasets and caches intact.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.dynamic import (
    CheckFailure, CheckResult, ConfigureRequest, CreateResult, DiffResult, ReadResult, ResourceProvider, UpdateResult,
)
from pulumi.dynamic.dynamic import PROVIDER_KEY
from pulumi.output import Unknown
from pulumi.runtime import rpc

from infra import pricing
from infra.config import NAMESPACE, SECRETS
from infra.runpod.client import RETRY_STATUSES, NotFound, RunpodClient, RunpodError

API_KEY_CONFIG = f"{NAMESPACE}:runpodApiKey"
MIN_VOLUME_GB, MAX_VOLUME_GB = 10, 4096


def is_unknown(value: Any) -> bool:
    """During preview an input computed from another resource is not known yet."""
    return isinstance(value, Unknown) or value == rpc.UNKNOWN


def changed_keys(olds: dict[str, Any], news: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if olds.get(key) != news.get(key)]


def whole_numbers(props: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Pulumi hands a provider its numbers as protobuf doubles (10 arrives as 10.0); RunPod wants integers."""
    return {
        key: int(value) if key in keys and isinstance(value, float) and value.is_integer() else value
        for key, value in props.items()
    }


class RunpodProvider(ResourceProvider):
    """Shared by the RunPod providers: the API key from `configure()` (never pickled) and retry-safe creates."""

    def __init__(self, retries: int = 6, backoff: float = 0.5, timeout: float = 30.0):
        super().__init__()
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout

    def configure(self, req: ConfigureRequest) -> None:
        api_key = req.config.get(API_KEY_CONFIG)
        if api_key:
            self._api_key = api_key

    def __getstate__(self) -> dict[str, Any]:
        # Pulumi pickles the provider into the state: the key stays in the process that configured it.
        return {name: value for name, value in self.__dict__.items() if name != "_api_key"}

    def client(self, retries: int | None = None) -> RunpodClient:
        api_key = self.__dict__.get("_api_key") or os.environ.get(SECRETS["runpodApiKey"], "")
        return RunpodClient(api_key, retries=self.retries if retries is None else retries, backoff=self.backoff, timeout=self.timeout)

    def create_once(self, find: Callable[[RunpodClient], dict | None], post: Callable[[RunpodClient], dict]) -> dict:
        """POST without blind retries: before every try, look for what an earlier try may have created.

        RunPod's creates take no idempotency key, and a POST that timed out may still have created the thing.
        So the POST goes through a client that does not retry, and each retry first lists what exists (`find`).
        The wait before that look grows with each try, to let a slow create land first.
        """
        lookup, once = self.client(), self.client(retries=0)
        for attempt in range(self.retries + 1):
            existing = find(lookup)
            if existing is not None:
                return existing
            try:
                return post(once)
            except RunpodError as error:
                transient = error.status == 0 or error.status in RETRY_STATUSES
                if not transient or attempt == self.retries:
                    raise
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")


# --- NetworkVolume ---

VOLUME_REPLACE_KEYS = ("dataCenter",)  # a volume is pinned to its data center
VOLUME_UPDATE_KEYS = ("name", "sizeGb", "keepOnDestroy")  # keepOnDestroy changes state only
VOLUME_INTEGER_KEYS = ("sizeGb", "size")


class NetworkVolumeProvider(RunpodProvider):
    """Inputs: name, sizeGb, dataCenter, keepOnDestroy. Outputs add volumeId and size (what RunPod reports)."""

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        olds, news = whole_numbers(olds, VOLUME_INTEGER_KEYS), whole_numbers(news, VOLUME_INTEGER_KEYS)
        failures = []
        name, size, data_center = news.get("name"), news.get("sizeGb"), news.get("dataCenter")
        if not is_unknown(name) and not (isinstance(name, str) and name):
            failures.append(CheckFailure("name", "a network volume needs a non-empty name"))
        if not is_unknown(size):
            if not isinstance(size, int) or isinstance(size, bool) or not MIN_VOLUME_GB <= size <= MAX_VOLUME_GB:
                failures.append(CheckFailure("sizeGb", f"must be a whole number of GB from {MIN_VOLUME_GB} to {MAX_VOLUME_GB} (got {size!r})"))
            elif isinstance(olds.get("sizeGb"), int) and size < olds["sizeGb"] and olds.get("dataCenter") == data_center:
                failures.append(CheckFailure(
                    "sizeGb",
                    f"a RunPod network volume cannot shrink ({olds['sizeGb']} GB -> {size} GB); keep sizeGb at "
                    f"{olds['sizeGb']} or more, or create a new volume under another stack",
                ))
        if not is_unknown(data_center) and data_center not in pricing.RUNPOD_DATA_CENTERS:
            failures.append(CheckFailure(
                "dataCenter", f"{data_center!r} is not a data center with network volumes; allowed: {', '.join(pricing.RUNPOD_DATA_CENTERS)}"
            ))
        if not is_unknown(news.get("keepOnDestroy")) and not isinstance(news.get("keepOnDestroy"), bool):
            failures.append(CheckFailure("keepOnDestroy", "must be true or false"))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        olds, news = whole_numbers(olds, VOLUME_INTEGER_KEYS), whole_numbers(news, VOLUME_INTEGER_KEYS)
        replaces = changed_keys(olds, news, VOLUME_REPLACE_KEYS)
        updates = changed_keys(olds, news, VOLUME_UPDATE_KEYS)
        return DiffResult(changes=bool(replaces or updates), replaces=replaces)

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
        self.client().delete_volume(id_)


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
