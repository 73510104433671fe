"""Pod: a RunPod GPU pod as a Pulumi dynamic resource (REST v2 through RunpodClient).

What changes in place and what replaces follows RunPod's PATCH: name, image, env, container disk and the
mount path are mutable (a running pod restarts its container with them; a stopped pod is started again when
its image or env changed, so a changed spec trains); the GPU, the cloud, the data centers and the network
volume are fixed at create, so changing them replaces the pod, old one first (never two trainers on one volume,
and the retry-safe create would otherwise adopt the old pod by its name).

The API key and the retry-safe create: see `RunpodProvider` in volume.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, ReadResult, UpdateResult
from pulumi.dynamic.dynamic import PROVIDER_KEY

from cloudapi.runpod_rest import NotFound, RunpodClient
from contract.spec import ENV_MANAGED, WORKSPACE_MOUNT
from infra.config import is_pinned
from infra.dynamic import is_unknown, whole_numbers
from infra.runpod_backend import catalog
from infra.runpod_backend.provider import RunpodProvider

POD_REPLACE_KEYS = ("gpuTypeId", "gpuCount", "cloud", "dataCenterIds", "networkVolumeId")
POD_UPDATE_KEYS = ("name", "image", "env", "containerDiskGb", "volumeMountPath")
POD_INTEGER_KEYS = ("gpuCount", "containerDiskGb")
STOPPED_STATUSES = ("EXITED", "ERROR")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class PodProvider(RunpodProvider):
    """Inputs: name, image, gpuTypeId, gpuCount, cloud, dataCenterIds, containerDiskGb, env, networkVolumeId,
    volumeMountPath. Outputs add podId, status, dataCenterId, costPerHour, createdAt (as of the last create,
    update or refresh; `make status` reads them live)."""

    replace_keys, update_keys, integer_keys = POD_REPLACE_KEYS, POD_UPDATE_KEYS, POD_INTEGER_KEYS

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        news = whole_numbers(news, POD_INTEGER_KEYS)
        failures: list[CheckFailure] = []

        def fail(key: str, reason: str) -> None:
            failures.append(CheckFailure(key, reason))

        known = {key: value for key, value in news.items() if not is_unknown(value)}
        if "name" in known and not (isinstance(known["name"], str) and known["name"]):
            fail("name", "a pod needs a non-empty name")
        if "image" in known and not (isinstance(known["image"], str) and is_pinned(known["image"])):
            fail("image", f"must be a pinned image reference (a version tag or @sha256 digest, never latest): {known['image']!r}")
        gpu = catalog.RUNPOD_GPUS.get(known.get("gpuTypeId", ""))
        if "gpuTypeId" in known and gpu is None:
            fail("gpuTypeId", f"unknown RunPod GPU id {known['gpuTypeId']!r}; allowed: {', '.join(sorted(catalog.RUNPOD_GPUS))}")
        count = known.get("gpuCount", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 8:
            fail("gpuCount", f"must be 1 to 8 (got {count!r})")
        cloud = known.get("cloud", "SECURE")
        if cloud not in ("SECURE", "COMMUNITY"):
            fail("cloud", f"must be SECURE or COMMUNITY (got {cloud!r})")
        elif cloud == "COMMUNITY":
            if news.get("networkVolumeId"):
                fail("cloud", "a pod that mounts a network volume must run on SECURE cloud")
            if gpu is not None and gpu.community_usd is None:
                fail("cloud", f"{gpu.id} is not offered on COMMUNITY cloud")
        centers = known.get("dataCenterIds", [])
        if not isinstance(centers, list) or any(not is_unknown(dc) and dc not in catalog.RUNPOD_DATA_CENTERS for dc in centers):
            data_centers = ", ".join(catalog.RUNPOD_DATA_CENTERS)
            fail("dataCenterIds", f"must be a list of RunPod data centers ({data_centers}); got {centers!r}")
        disk = known.get("containerDiskGb", 20)
        if not isinstance(disk, int) or isinstance(disk, bool) or not 1 <= disk <= 1000:
            fail("containerDiskGb", f"must be 1 to 1000 GB (got {disk!r})")
        if "env" in known:
            failures += _env_failures(known["env"])
        path = known.get("volumeMountPath", WORKSPACE_MOUNT)
        if not (isinstance(path, str) and path.startswith("/")):
            fail("volumeMountPath", f"must be an absolute path (got {path!r})")
        return CheckResult(news, failures)

    def create(self, props: dict[str, Any]) -> CreateResult:
        props = whole_numbers(props, POD_INTEGER_KEYS)

        def find(client: RunpodClient) -> dict | None:
            # this create's own pod from an earlier try: same name, the reaper's label, same fixed settings
            return next((pod for pod in client.list_pods() if _same_pod(pod, props)), None)

        pod = self.create_once(find, lambda client: client.create_pod(_create_body(props)))
        pod = self._converge(self.client(), pod, props)
        return CreateResult(pod["id"], _pod_outputs(props, pod))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        props = whole_numbers(props, POD_INTEGER_KEYS)
        try:
            pod = self.client().get_pod(id_)
        except NotFound:
            return ReadResult("", {})  # terminated outside Pulumi: the engine drops it from the state
        live = {
            **props,
            "name": pod["name"],
            "image": pod["image"],
            "env": pod["env"],
            "gpuTypeId": pod["gpu"]["id"],
            "gpuCount": pod["gpu"]["count"],
            "cloud": pod["cloud"],
            "containerDiskGb": pod["disk"],
            "networkVolumeId": _network_mount(pod).get("volumeId"),
            "volumeMountPath": _network_mount(pod).get("path", props.get("volumeMountPath")),
        }
        return ReadResult(id_, _pod_outputs(live, pod))

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        news = whole_numbers(news, POD_INTEGER_KEYS)
        client = self.client()
        try:
            pod = client.get_pod(id_)
        except NotFound:
            raise RuntimeError(
                f"pod {id_} ({news['name']}) no longer exists on RunPod; run `pulumi refresh`, then `pulumi up` creates it again"
            ) from None
        return UpdateResult(_pod_outputs(news, self._converge(client, pod, news)))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        self.client().terminate_pod(id_)  # idempotent: a pod already gone is what we wanted

    def _converge(self, client: RunpodClient, pod: dict, props: dict[str, Any]) -> dict:
        """PATCH what differs between the live pod and the inputs; start a stopped pod that has a new run to do."""
        body: dict[str, Any] = {}
        for key, api_key in (("name", "name"), ("image", "image"), ("env", "env"), ("containerDiskGb", "disk")):
            if pod[api_key] != props[key]:
                body[api_key] = props[key]
        mount = _network_mount(pod)
        if mount and mount.get("path") != props["volumeMountPath"]:
            body["mounts"] = {"network": [{"volumeId": mount["volumeId"], "path": props["volumeMountPath"]}]}
        if body:
            pod = client.update_pod(pod["id"], body)
        if pod["status"] in STOPPED_STATUSES and ("image" in body or "env" in body):
            pod = client.pod_action(pod["id"], "start")
        return pod


def _env_failures(env: Any) -> list[CheckFailure]:
    if not isinstance(env, dict):
        return [CheckFailure("env", "must be a mapping of variable names to strings")]
    failures = [
        CheckFailure("env", f"{name!r}: a variable name is letters, digits and underscores, not starting with a digit")
        for name in env if not _ENV_NAME.match(name)
    ]
    # values are not echoed: env holds secrets (HF_TOKEN, WANDB_API_KEY)
    failures += [CheckFailure("env", f"{name}: the value must be a string") for name, value in env.items()
                 if not is_unknown(value) and not isinstance(value, str)]
    if env.get(ENV_MANAGED) != "1" and not is_unknown(env.get(ENV_MANAGED)):
        failures.append(CheckFailure("env", f"every lorastack pod carries {ENV_MANAGED}=1 (the reaper's label)"))
    return failures


def _network_mount(pod: dict) -> dict:
    network = (pod.get("mounts") or {}).get("network") or []
    return network[0] if network else {}


def _same_pod(pod: dict, props: dict[str, Any]) -> bool:
    return (
        pod["name"] == props["name"]
        and pod.get("env", {}).get(ENV_MANAGED) == "1"
        and pod["status"] != "TERMINATED"
        and pod["gpu"]["id"] == props["gpuTypeId"]
        and pod["gpu"]["count"] == props["gpuCount"]
        and pod["cloud"] == props["cloud"]
        and _network_mount(pod).get("volumeId") == props.get("networkVolumeId")
    )


def _create_body(props: dict[str, Any]) -> dict:
    body: dict[str, Any] = {
        "name": props["name"],
        "image": props["image"],
        "gpu": {"id": props["gpuTypeId"], "count": props["gpuCount"]},
        "cloud": props["cloud"],
        "dataCenterIds": list(props["dataCenterIds"]),
        "disk": props["containerDiskGb"],
        "env": dict(props["env"]),
        "ports": [],
    }
    if props.get("networkVolumeId"):
        body["mounts"] = {"network": [{"volumeId": props["networkVolumeId"], "path": props["volumeMountPath"]}]}
    return body


def _pod_outputs(props: dict[str, Any], pod: dict) -> dict[str, Any]:
    inputs = {key: value for key, value in props.items() if key != PROVIDER_KEY}
    return {
        **inputs,
        "podId": pod["id"],
        "status": pod["status"],
        "dataCenterId": pod["dataCenterId"],
        "costPerHour": pod["cost"],
        "createdAt": pod["createdAt"],
    }


@dataclass
class PodArgs:
    name: pulumi.Input[str]
    image: pulumi.Input[str]
    gpu_type_id: pulumi.Input[str]
    env: pulumi.Input[dict[str, str]]  # a secret Output when it holds a token
    gpu_count: pulumi.Input[int] = 1
    cloud: pulumi.Input[str] = "SECURE"
    data_center_ids: pulumi.Input[list[str]] = field(default_factory=list)
    container_disk_gb: pulumi.Input[int] = 40
    network_volume_id: pulumi.Input[str] | None = None
    volume_mount_path: pulumi.Input[str] = WORKSPACE_MOUNT


class Pod(pulumi.dynamic.Resource, module="runpod", name="Pod"):
    podId: pulumi.Output[str]
    status: pulumi.Output[str]
    dataCenterId: pulumi.Output[str]
    costPerHour: pulumi.Output[float]
    env: pulumi.Output[dict[str, str]]

    def __init__(self, resource_name: str, args: PodArgs, opts: pulumi.ResourceOptions | None = None):
        props = {
            "name": args.name,
            "image": args.image,
            "gpuTypeId": args.gpu_type_id,
            "gpuCount": args.gpu_count,
            "cloud": args.cloud,
            "dataCenterIds": args.data_center_ids,
            "containerDiskGb": args.container_disk_gb,
            "env": args.env,
            "networkVolumeId": args.network_volume_id,
            "volumeMountPath": args.volume_mount_path,
            "podId": None,
            "status": None,
            "dataCenterId": None,
            "costPerHour": None,
            "createdAt": None,
        }
        # The provider host does not take secrets (it gets plain values), so the env it returns is marked
        # secret again here. Delete-before-replace: see the module docstring.
        fixed = pulumi.ResourceOptions(additional_secret_outputs=["env"], delete_before_replace=True)
        super().__init__(PodProvider(), resource_name, props, pulumi.ResourceOptions.merge(opts, fixed))
