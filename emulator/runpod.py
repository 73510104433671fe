"""A local RunPod REST v2 API (contract: shared/reference/runpod-rest-v2-openapi.json), state in memory.

Pods, pod actions, pod logs (Server-Sent Events), network volumes and the GPU / data-center catalog, with
the rules that bite in use: Bearer auth, unknown body properties refused, unknown GPU ids, network volumes
on Secure Cloud only and in their own data center, volumes that only grow, no deleting a mounted volume.
What a pod "runs" is pluggable (`PodRuntime`): the default marks it RUNNING; the demo plugs in one that runs
`python -m training` as a local process.

    python -m emulator.runpod --port 8100      # then RUNPOD_API_BASE_URL=http://127.0.0.1:8100
"""

from __future__ import annotations

import argparse
import json
import secrets as token_source
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from cloudapi.runpod_rest import LIVE_POD_STATUSES
from emulator.server import ApiError, JsonApi, Request, Response, serve
from infra.runpod_backend import catalog

# Which actions each status allows (the spec's `actions` field and its 409 rule).
ACTIONS = {
    "PROVISIONING": ["stop", "terminate"],
    "STARTING": ["stop", "terminate"],
    "RUNNING": ["stop", "restart", "terminate"],
    "EXITED": ["start", "terminate"],
    "ERROR": ["start", "terminate"],
    "TERMINATED": [],
}
UNBILLED_STATUSES = {"EXITED", "TERMINATED"}
MAX_GPUS_PER_POD = 8
MAX_LOG_TAIL = 5000
_REGIONS = {"US": "NORTH_AMERICA", "CA": "NORTH_AMERICA", "EU": "EUROPE", "EUR": "EUROPE", "AP": "ASIA", "OC": "OCEANIA"}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _new_id(length: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(token_source.choice(alphabet) for _ in range(length))


# --- request validation: unknown properties -> 400, contract violations (types, required, bounds) -> 422 ---


class _BodyCheck:
    """Collects problems in the spec's `errors` style ("$.gpu: additional properties 'x' not allowed")."""

    def __init__(self) -> None:
        self.unknown: list[str] = []
        self.invalid: list[str] = []

    def object(self, value: Any, where: str, fields: dict[str, Callable[[Any, str], None]], required: tuple = ()) -> dict:
        if not isinstance(value, dict):
            self.invalid.append(f"{where}: expected an object")
            return {}
        extra = [key for key in value if key not in fields]
        if extra:
            self.unknown.append(f"{where}: additional properties {', '.join(repr(k) for k in extra)} not allowed")
        for key in required:
            if key not in value:
                self.invalid.append(f"{where}: missing required property '{key}'")
        for key, check in fields.items():
            if key in value:
                check(value[key], f"{where}.{key}")
        return value

    def raise_if_any(self) -> None:
        if self.unknown:
            raise ApiError(400, "request body has properties the API does not know", self.unknown + self.invalid)
        if self.invalid:
            raise ApiError(422, "Request validation failed.", self.invalid)

    # field checkers, each `(value, where) -> None`
    def string(self, min_length: int = 0) -> Callable[[Any, str], None]:
        def check(value: Any, where: str) -> None:
            if not isinstance(value, str):
                self.invalid.append(f"{where}: expected a string")
            elif len(value) < min_length:
                self.invalid.append(f"{where}: must be at least {min_length} character(s)")
        return check

    def nullable_string(self) -> Callable[[Any, str], None]:
        def check(value: Any, where: str) -> None:
            if value is not None and not isinstance(value, str):
                self.invalid.append(f"{where}: expected a string or null")
        return check

    def integer(self, minimum: int | None = None, maximum: int | None = None) -> Callable[[Any, str], None]:
        def check(value: Any, where: str) -> None:
            if not isinstance(value, int) or isinstance(value, bool):
                self.invalid.append(f"{where}: expected an integer")
            elif minimum is not None and value < minimum:
                self.invalid.append(f"{where}: must be >= {minimum}")
            elif maximum is not None and value > maximum:
                self.invalid.append(f"{where}: must be <= {maximum}")
        return check

    def boolean(self) -> Callable[[Any, str], None]:
        def check(value: Any, where: str) -> None:
            if not isinstance(value, bool):
                self.invalid.append(f"{where}: expected a boolean")
        return check

    def enum(self, *allowed: str) -> Callable[[Any, str], None]:
        def check(value: Any, where: str) -> None:
            if value not in allowed:
                self.invalid.append(f"{where}: must be one of {', '.join(allowed)}")
        return check

    def strings(self, max_items: int | None = None) -> Callable[[Any, str], None]:
        def check(value: Any, where: str) -> None:
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                self.invalid.append(f"{where}: expected an array of strings")
            elif max_items is not None and len(value) > max_items:
                self.invalid.append(f"{where}: at most {max_items} item(s)")
        return check

    def string_map(self) -> Callable[[Any, str], None]:
        def check(value: Any, where: str) -> None:
            if not isinstance(value, dict):
                self.invalid.append(f"{where}: expected an object of strings")
                return
            for key, item in value.items():
                if not isinstance(item, str):
                    self.invalid.append(f"{where}.{key}: expected a string")
        return check

    def nested(self, fields: dict[str, Callable[[Any, str], None]], required: tuple = ()) -> Callable[[Any, str], None]:
        def check(value: Any, where: str) -> None:
            self.object(value, where, fields, required)
        return check

    def array_of(self, item: Callable[[Any, str], None], max_items: int) -> Callable[[Any, str], None]:
        def check(value: Any, where: str) -> None:
            if not isinstance(value, list):
                self.invalid.append(f"{where}: expected an array")
                return
            if len(value) > max_items:
                self.invalid.append(f"{where}: at most {max_items} item(s)")
            for index, entry in enumerate(value):
                item(entry, f"{where}[{index}]")
        return check


def _container_fields(check: _BodyCheck) -> dict[str, Callable[[Any, str], None]]:
    """ContainerConfig: shared by CreatePodRequest and UpdatePodRequest."""
    return {
        "args": check.string(),
        "disk": check.integer(minimum=1),
        "env": check.string_map(),
        "image": check.string(min_length=1),
        "ports": check.strings(),
        "registry": check.nullable_string(),
    }


def _mounts_field(check: _BodyCheck) -> Callable[[Any, str], None]:
    return check.nested({
        "persistent": check.nested({"size": check.integer(minimum=10), "path": check.string(min_length=1)}, ("size", "path")),
        "network": check.array_of(
            check.nested({"volumeId": check.string(min_length=1), "path": check.string(min_length=1)}, ("volumeId", "path")),
            max_items=1,
        ),
    })


# --- state ---


@dataclass
class LogLine:
    seq: int
    ts: str
    source: str  # container | system
    line: str

    @property
    def event_id(self) -> str:
        return f"{self.ts}/{self.seq:012d}"


@dataclass
class PodRecord:
    id: str
    name: str
    image: str
    gpu_id: str
    gpu_count: int
    cloud: str
    data_center_id: str
    disk: int
    env: dict[str, str]
    mounts: dict
    args: str = ""
    ports: list[str] = field(default_factory=list)
    registry: str | None = None
    locked: bool = False
    status: str = "PROVISIONING"
    created_at: str = field(default_factory=_now)
    started_at: str | None = None
    started_monotonic: float | None = None
    # RunPod gives each pod a pod-scoped RUNPOD_API_KEY (not shown in `env`); a runtime hands it to the process.
    pod_api_key: str = field(default_factory=lambda: "pod-" + token_source.token_hex(16))
    logs: list[LogLine] = field(default_factory=list)

    @property
    def network_volume_id(self) -> str | None:
        network = self.mounts.get("network") or []
        return network[0]["volumeId"] if network else None

    def usd_per_hour(self) -> float:
        if self.status in UNBILLED_STATUSES:
            return 0.0
        gpu = catalog.RUNPOD_GPUS[self.gpu_id]
        price = gpu.secure_usd if self.cloud == "SECURE" else gpu.community_usd
        return round((price or 0.0) * self.gpu_count, 4)

    def to_json(self) -> dict:
        running = self.status == "RUNNING"
        return {
            "id": self.id,
            "name": self.name,
            "image": self.image,
            "args": self.args,
            "disk": self.disk,
            "ports": list(self.ports),
            "env": dict(self.env),
            "registry": self.registry,
            "status": self.status,
            "actions": list(ACTIONS[self.status]),
            "mounts": json.loads(json.dumps(self.mounts)),
            "gpu": {"id": self.gpu_id, "count": self.gpu_count},
            "cloud": self.cloud,
            "dataCenterId": self.data_center_id,
            "cudaVersion": "12.8",
            "ssh": {
                "proxy": {
                    "host": "ssh.runpod.io", "port": 22, "username": f"{self.id}-emulated",
                    "command": f"ssh {self.id}-emulated@ssh.runpod.io",
                },
                "direct": None,
            },
            "template": None,
            "cost": self.usd_per_hour(),
            "locked": self.locked,
            "globalNetworking": {"enabled": False},
            "runtime": {"uptime": int(time.monotonic() - (self.started_monotonic or time.monotonic())), "ports": []}
            if running else None,
            "createdAt": self.created_at,
            "startedAt": self.started_at,
        }


@dataclass
class VolumeRecord:
    id: str
    name: str
    size: int
    data_center: str
    type: str = "STANDARD"

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "size": self.size, "dataCenter": self.data_center, "type": self.type}


class PodRuntime:
    """What an emulated pod runs. Hooks are called outside the API's lock, after the status change.

    A runtime drives its pods through the API it is bound to: `api.append_log(pod_id, line)` and
    `api.set_status(pod_id, status)`. This default one has no process: a started pod is simply RUNNING.
    """

    api: RunpodApi

    def bind(self, api: RunpodApi) -> None:
        self.api = api

    def on_start(self, pod: dict) -> None:
        self.api.set_status(pod["id"], "RUNNING")

    def on_stop(self, pod: dict) -> None:
        """The pod was stopped (EXITED): end whatever runs for it."""

    def on_terminate(self, pod: dict) -> None:
        """The pod is gone for good."""

    def on_volume_grown(self, volume_id: str, added_gb: int) -> None:
        """The volume grew by `added_gb` (its room, where the runtime models one, grows with it)."""

    def on_volume_create(self, volume_id: str) -> None:
        """A network volume was created (ProcessRuntime: its S3 bucket, emulator/volume_buckets.py)."""

    def on_volume_delete(self, volume_id: str) -> None:
        """A network volume was deleted, with everything on it."""


class RunpodApi(JsonApi):
    def __init__(self, api_key: str | None = None, runtime: PodRuntime | None = None, provisioning_seconds: float = 0.0):
        """`api_key`: the one key accepted (None: any non-empty Bearer token). `provisioning_seconds`: how long
        a created or started pod stays PROVISIONING/STARTING before its runtime starts it."""
        super().__init__()
        self.api_key = api_key
        self.runtime = runtime or PodRuntime()
        self.runtime.bind(self)
        self.provisioning_seconds = provisioning_seconds
        self.pods: dict[str, PodRecord] = {}
        self.volumes: dict[str, VolumeRecord] = {}
        self._log_seq = 0
        self._log_changed = threading.Condition(self.lock)
        self.route("GET", "/v2/pods", self.list_pods)
        self.route("POST", "/v2/pods", self.create_pod)
        self.route("GET", "/v2/pods/{id}", self.get_pod)
        self.route("PATCH", "/v2/pods/{id}", self.update_pod)
        self.route("DELETE", "/v2/pods/{id}", self.delete_pod)
        self.route("POST", "/v2/pods/{id}/action", self.pod_action)
        self.route("GET", "/v2/pods/{id}/logs", self.pod_logs)
        self.route("GET", "/v2/network-volumes", self.list_volumes)
        self.route("POST", "/v2/network-volumes", self.create_volume)
        self.route("GET", "/v2/network-volumes/{id}", self.get_volume)
        self.route("PATCH", "/v2/network-volumes/{id}", self.update_volume)
        self.route("DELETE", "/v2/network-volumes/{id}", self.delete_volume)
        self.route("GET", "/v2/catalog/gpus", self.list_gpus)
        self.route("GET", "/v2/catalog/gpus/{id}", self.get_gpu)
        self.route("GET", "/v2/catalog/datacenters", self.list_data_centers)

    def reset(self) -> None:
        """Forget every pod, volume, recorded request and pending fault (one server, many tests)."""
        with self.lock:
            self.pods.clear()
            self.volumes.clear()
            self.requests.clear()
            self._faults.clear()
            self._log_changed.notify_all()

    # --- auth ---

    def authorize(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing bearer token")
        token = token.strip()
        if self.api_key is None or token == self.api_key:
            return
        with self.lock:
            if any(pod.pod_api_key == token for pod in self.pods.values()):
                return
        raise ApiError(401, "invalid API key")

    # --- what a runtime (and a test) drives ---

    def append_log(self, pod_id: str, line: str, source: str = "container") -> None:
        with self.lock:
            pod = self.pods.get(pod_id)
            if pod is None:
                return  # a process may log after its pod was terminated
            self._log_seq += 1
            pod.logs.append(LogLine(self._log_seq, _now(), source, line))
            self._log_changed.notify_all()

    def set_status(self, pod_id: str, status: str) -> None:
        if status not in ("RUNNING", "EXITED", "ERROR"):
            raise ValueError(f"a runtime sets RUNNING, EXITED or ERROR, not {status}")
        with self.lock:
            pod = self.pods.get(pod_id)
            if pod is None:
                return
            if status == "RUNNING" and pod.status != "RUNNING":
                pod.started_at = _now()
                pod.started_monotonic = time.monotonic()
                self._system_log(pod, "container is running")
            elif status != "RUNNING":
                self._system_log(pod, f"container {status.lower()}")
            pod.status = status
            self._log_changed.notify_all()

    def terminate(self, pod_id: str) -> None:
        """Terminate a pod from the emulator's side (a lost host); as DELETE /v2/pods/{id} does."""
        self._terminate(pod_id)

    def pod_api_key(self, pod_id: str) -> str:
        with self.lock:
            return self._pod(pod_id).pod_api_key

    def _system_log(self, pod: PodRecord, line: str) -> None:
        self._log_seq += 1
        pod.logs.append(LogLine(self._log_seq, _now(), "system", line))

    # --- pods ---

    def _pod(self, pod_id: str) -> PodRecord:
        pod = self.pods.get(pod_id)
        if pod is None:
            raise ApiError(404, f"pod {pod_id} not found")
        return pod

    def list_pods(self, request: Request) -> dict:
        with self.lock:
            return {"pods": [pod.to_json() for pod in self.pods.values()]}

    def get_pod(self, request: Request) -> dict:
        with self.lock:
            return self._pod(request.params["id"]).to_json()

    def create_pod(self, request: Request) -> Response:
        check = _BodyCheck()
        body = check.object(request.body, "$", {
            **_container_fields(check),
            "name": check.string(min_length=1),
            "cloud": check.enum("SECURE", "COMMUNITY"),
            "cpu": check.nested({"flavorId": check.string(), "vcpuCount": check.integer(minimum=1)}),
            "dataCenterIds": check.strings(),
            "globalNetworking": check.boolean(),
            "gpu": check.nested({
                "id": check.string(min_length=1),
                "count": check.integer(minimum=1),
                "allowedCudaVersions": check.strings(),
                "minCudaVersion": check.string(),
            }, ("id",)),
            "mounts": _mounts_field(check),
            "startJupyter": check.boolean(),
            "startSsh": check.boolean(),
            "templateId": check.string(min_length=1),
        }, ("name",))
        if isinstance(request.body, dict) and "image" not in body and "templateId" not in body:
            check.invalid.append("$: missing required property 'image' (required unless templateId is set)")
        check.raise_if_any()
        if "templateId" in body:
            raise ApiError(404, f"template {body['templateId']} not found (the emulator has no templates)")
        if ("gpu" in body) == ("cpu" in body):
            raise ApiError(400, "set exactly one of gpu or cpu")
        if "cpu" in body:
            raise ApiError(400, "CPU pods are not emulated")
        gpu_id, count = body["gpu"]["id"], body["gpu"].get("count", 1)
        cloud = body.get("cloud", "SECURE")
        gpu = catalog.RUNPOD_GPUS.get(gpu_id)
        if gpu is None:
            raise ApiError(400, f"unknown GPU type {gpu_id!r}; see GET /v2/catalog/gpus")
        if cloud == "COMMUNITY" and gpu.community_usd is None:
            raise ApiError(400, f"{gpu_id} is not offered on COMMUNITY cloud")
        if count > MAX_GPUS_PER_POD:
            raise ApiError(400, f"gpu.count {count} exceeds the {MAX_GPUS_PER_POD} GPUs of one machine")
        wanted = body.get("dataCenterIds") or []
        unknown = [dc for dc in wanted if dc not in catalog.RUNPOD_DATA_CENTERS]
        if unknown:
            raise ApiError(400, f"unknown data center(s): {', '.join(unknown)}")
        mounts = body.get("mounts") or {}
        if "persistent" in mounts and "network" in mounts:
            raise ApiError(400, "mounts.persistent and mounts.network are mutually exclusive")
        with self.lock:
            data_center = wanted[0] if wanted else catalog.RUNPOD_DATA_CENTERS[0]
            if mounts.get("network"):
                volume_id = mounts["network"][0]["volumeId"]
                volume = self.volumes.get(volume_id)
                if volume is None:
                    raise ApiError(400, f"network volume {volume_id} not found")
                if cloud != "SECURE":
                    raise ApiError(400, "network volumes can only be mounted by SECURE cloud pods")
                if wanted and volume.data_center not in wanted:
                    raise ApiError(
                        400,
                        f"network volume {volume_id} is in {volume.data_center}, which is not among dataCenterIds "
                        f"({', '.join(wanted)}): a pod runs where its volume is",
                    )
                data_center = volume.data_center
            pod = PodRecord(
                id=_new_id(14), name=body["name"], image=body["image"], gpu_id=gpu_id, gpu_count=count, cloud=cloud,
                data_center_id=data_center, disk=body.get("disk", 50), env=dict(body.get("env") or {}),
                mounts=mounts, args=body.get("args", ""), ports=list(body.get("ports") or []),
                registry=body.get("registry"),
            )
            self.pods[pod.id] = pod
            self._system_log(pod, f"pod created on {count}x {gpu_id} in {data_center}")
            created = pod.to_json()
        self._boot(pod.id)
        return Response(201, created)

    def update_pod(self, request: Request) -> dict:
        check = _BodyCheck()
        body = check.object(request.body, "$", {
            **_container_fields(check),
            "globalNetworking": check.boolean(),
            "locked": check.boolean(),
            "mounts": _mounts_field(check),
            "name": check.string(min_length=1),
            "templateId": check.string(),
        })
        check.raise_if_any()
        if "templateId" in body:
            raise ApiError(404, f"template {body['templateId']} not found (the emulator has no templates)")
        with self.lock:
            pod = self._pod(request.params["id"])
            mounts = body.get("mounts") or {}
            if "network" in mounts:
                if not mounts["network"]:
                    raise ApiError(400, "mounts.network: [] is refused: clearing mounts is not supported")
                if pod.network_volume_id is None:
                    raise ApiError(400, "this pod was created without a network mount; mount kinds are fixed at create")
                if mounts["network"][0]["volumeId"] != pod.network_volume_id:
                    raise ApiError(400, "the volumeId of a network mount is immutable")
            if "persistent" in mounts and "persistent" not in pod.mounts:
                raise ApiError(400, "this pod was created without a persistent mount; mount kinds are fixed at create")
            before = (pod.image, pod.env, pod.args, json.dumps(pod.mounts, sort_keys=True))
            for key, attribute in (("name", "name"), ("image", "image"), ("args", "args"), ("disk", "disk"),
                                   ("ports", "ports"), ("registry", "registry"), ("locked", "locked")):
                if key in body:
                    setattr(pod, attribute, body[key])
            if "env" in body:
                pod.env = dict(body["env"])  # PATCH replaces the whole env
            if mounts:
                pod.mounts = {**pod.mounts, **mounts}
            changed = before != (pod.image, pod.env, pod.args, json.dumps(pod.mounts, sort_keys=True))
            # a new image, env or mount resets the container of a running pod
            restart = changed and pod.status == "RUNNING"
            if restart:
                pod.status = "STARTING"
                self._system_log(pod, "container configuration changed: restarting")
            snapshot = pod.to_json()
        if restart:
            self.runtime.on_stop(snapshot)
            self._boot(pod.id)
            with self.lock:
                snapshot = self._pod(pod.id).to_json()
        return snapshot

    def delete_pod(self, request: Request) -> Response:
        self._terminate(request.params["id"])
        return Response(204)

    def pod_action(self, request: Request) -> Response:
        check = _BodyCheck()
        body = check.object(request.body, "$", {"action": check.enum("start", "stop", "restart", "terminate")}, ("action",))
        check.raise_if_any()
        pod_id, action = request.params["id"], body["action"]
        if action == "terminate":
            self._terminate(pod_id)
            return Response(204)
        with self.lock:
            pod = self._pod(pod_id)
            if action not in ACTIONS[pod.status]:
                allowed = ", ".join(ACTIONS[pod.status]) or "none"
                raise ApiError(409, f"cannot {action} a pod that is {pod.status}; allowed: {allowed}")
            if action == "stop" and pod.locked:
                raise ApiError(409, "the pod is locked")
            pod.status = "EXITED" if action == "stop" else "STARTING"
            self._system_log(pod, {"stop": "stopping pod", "start": "starting pod", "restart": "restarting container"}[action])
            snapshot = pod.to_json()
        if action in ("stop", "restart"):
            self.runtime.on_stop(snapshot)
        if action in ("start", "restart"):
            self._boot(pod_id)
        with self.lock:
            return Response(200, self._pod(pod_id).to_json())

    def _boot(self, pod_id: str) -> None:
        """After the provisioning delay, hand the pod to the runtime (which makes it RUNNING)."""

        def start() -> None:
            with self.lock:
                pod = self.pods.get(pod_id)
                if pod is None or pod.status not in ("PROVISIONING", "STARTING"):
                    return  # stopped or terminated while provisioning
                snapshot = pod.to_json()
            self.runtime.on_start(snapshot)

        if self.provisioning_seconds > 0:
            timer = threading.Timer(self.provisioning_seconds, start)
            timer.daemon = True
            timer.start()
        else:
            start()

    def _terminate(self, pod_id: str) -> None:
        with self.lock:
            pod = self._pod(pod_id)
            was_running = pod.status in LIVE_POD_STATUSES
            pod.status = "TERMINATED"
            snapshot = pod.to_json()
            del self.pods[pod_id]
            self._log_changed.notify_all()
        if was_running:
            self.runtime.on_stop(snapshot)
        self.runtime.on_terminate(snapshot)

    # --- pod logs (Server-Sent Events) ---

    def pod_logs(self, request: Request) -> Response:
        source = request.query.get("source")
        if source not in (None, "container", "system"):
            raise ApiError(422, "Request validation failed.", ["source: must be one of container, system"])
        tail = _int_or_422(request.query.get("tail", "100"), "tail")
        if not 0 <= tail <= MAX_LOG_TAIL:
            raise ApiError(422, "Request validation failed.", [f"tail: must be between 0 and {MAX_LOG_TAIL}"])
        pod_id = request.params["id"]
        with self.lock:
            logs = list(self._pod(pod_id).logs)
        lines = [line for line in logs if source in (None, line.source)]
        last_seq = logs[-1].seq if logs else 0
        # the resume cursor drives the backfill: Last-Event-ID (`<ts>/<seq>`) first, then `since`, then `tail`
        last_event_id = request.headers.get("last-event-id")
        since = request.query.get("since")
        if last_event_id:
            seq = _int_or_422(last_event_id.rpartition("/")[2], "Last-Event-ID")
            backfill = [line for line in lines if line.seq > seq]
        elif since:
            try:
                cutoff = datetime.fromisoformat(since)
                cutoff = cutoff if cutoff.tzinfo else cutoff.replace(tzinfo=UTC)
            except ValueError:
                raise ApiError(422, "Request validation failed.", ["since: expected an RFC 3339 timestamp"]) from None
            backfill = [line for line in lines if datetime.fromisoformat(line.ts) >= cutoff]
        else:
            backfill = lines[-tail:] if tail else []
        return Response(200, stream=self._stream(pod_id, source, backfill, last_seq))

    def _stream(self, pod_id: str, source: str | None, backfill: list[LogLine], last_seq: int) -> Iterator[bytes]:
        """Backfill, then follow new lines while the pod is live; the stream ends when the pod stops."""
        for line in backfill:
            yield _event(line)
        while True:
            with self.lock:
                pod = self.pods.get(pod_id)
                fresh = [line for line in (pod.logs if pod else []) if line.seq > last_seq]
                if not fresh and pod is not None and pod.status in LIVE_POD_STATUSES:
                    self._log_changed.wait(timeout=1.0)
                    continue
            for line in fresh:
                last_seq = line.seq
                if source in (None, line.source):
                    yield _event(line)
            if not fresh and (pod is None or pod.status not in LIVE_POD_STATUSES):
                return

    # --- network volumes ---

    def _volume(self, volume_id: str) -> VolumeRecord:
        volume = self.volumes.get(volume_id)
        if volume is None:
            raise ApiError(404, f"network volume {volume_id} not found")
        return volume

    def list_volumes(self, request: Request) -> dict:
        with self.lock:
            return {"networkVolumes": [volume.to_json() for volume in self.volumes.values()]}

    def get_volume(self, request: Request) -> dict:
        with self.lock:
            return self._volume(request.params["id"]).to_json()

    def create_volume(self, request: Request) -> Response:
        check = _BodyCheck()
        body = check.object(request.body, "$", {
            "dataCenter": check.string(min_length=1),
            "name": check.string(min_length=1),
            "size": check.integer(minimum=10, maximum=4096),
            "type": check.enum("STANDARD", "HIGH_PERFORMANCE"),
        }, ("name", "size", "dataCenter"))
        check.raise_if_any()
        if body["dataCenter"] not in catalog.RUNPOD_DATA_CENTERS:
            raise ApiError(400, f"data center {body['dataCenter']!r} does not offer network volumes")
        volume = VolumeRecord(_new_id(10), body["name"], body["size"], body["dataCenter"], body.get("type", "STANDARD"))
        with self.lock:
            self.volumes[volume.id] = volume
        self.runtime.on_volume_create(volume.id)
        return Response(201, volume.to_json())

    def update_volume(self, request: Request) -> dict:
        check = _BodyCheck()
        body = check.object(request.body, "$", {
            "name": check.string(min_length=1),
            "size": check.integer(minimum=10, maximum=4096),
        })
        if isinstance(request.body, dict) and not request.body:
            check.invalid.append("$: at least one property is required")
        check.raise_if_any()
        with self.lock:
            volume = self._volume(request.params["id"])
            if body.get("size", volume.size) < volume.size:
                raise ApiError(400, f"network volume storage cannot be reduced: {volume.size} GB -> {body['size']} GB")
            added = body.get("size", volume.size) - volume.size
            volume.name = body.get("name", volume.name)
            volume.size = body.get("size", volume.size)
            grown = volume.to_json()
        if added:
            self.runtime.on_volume_grown(volume.id, added)
        return grown

    def delete_volume(self, request: Request) -> Response:
        volume_id = request.params["id"]
        with self.lock:
            self._volume(volume_id)
            users = [pod.id for pod in self.pods.values() if pod.network_volume_id == volume_id]
            if users:
                raise ApiError(409, f"network volume {volume_id} is mounted by pod(s) {', '.join(users)}; terminate them first")
            del self.volumes[volume_id]
        self.runtime.on_volume_delete(volume_id)
        return Response(204)

    # --- catalog ---

    def list_gpus(self, request: Request) -> dict:
        return {"gpus": [_gpu_type(gpu) for gpu in catalog.RUNPOD_GPUS.values()]}

    def get_gpu(self, request: Request) -> dict:
        gpu_id = unquote(request.params["id"])  # GPU ids have spaces: "NVIDIA GeForce RTX 4090"
        gpu = catalog.RUNPOD_GPUS.get(gpu_id)
        if gpu is None:
            raise ApiError(404, f"GPU type {gpu_id} not found")
        return _gpu_type(gpu)

    def list_data_centers(self, request: Request) -> dict:
        return {"dataCenters": [
            {
                "id": dc,
                "name": dc.replace("-", " "),
                "region": _REGIONS.get(dc.split("-")[0], "UNKNOWN"),
                "globalNetwork": False,
                "networkVolumeTypes": ["STANDARD"],
                "compliance": [],
            }
            for dc in catalog.RUNPOD_DATA_CENTERS
        ]}


def _gpu_type(gpu: catalog.GpuType) -> dict:
    community = gpu.community_usd is not None
    return {
        "id": gpu.id,
        "name": gpu.name,
        "pool": None,
        "manufacturer": "NVIDIA",
        "memory": gpu.memory_gb,
        "secure": True,
        "community": community,
        # null, not 0.0, where a cloud does not offer the GPU: a zero would read as a free GPU
        "price": {"secure": gpu.secure_usd, "community": gpu.community_usd},
        "maxCount": {"secure": MAX_GPUS_PER_POD, "community": MAX_GPUS_PER_POD if community else 0},
    }


def _int_or_422(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ApiError(422, "Request validation failed.", [f"{name}: expected an integer"]) from None


def _event(line: LogLine) -> bytes:
    data = json.dumps({"ts": line.ts, "source": line.source, "line": line.line}, separators=(",", ":"))
    return f"id: {line.event_id}\ndata: {data}\n\n".encode()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A local RunPod REST v2 API (in memory).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--api-key", default=None, help="the one Bearer token accepted (default: any)")
    parser.add_argument("--provisioning-seconds", type=float, default=0.0)
    options = parser.parse_args(argv)
    api = RunpodApi(api_key=options.api_key, provisioning_seconds=options.provisioning_seconds)
    with serve(api, options.host, options.port) as base_url:
        print(f"RunPod emulator on {base_url} (export RUNPOD_API_BASE_URL={base_url})", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
