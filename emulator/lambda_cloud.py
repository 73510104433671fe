"""An emulator of Lambda Cloud's public API v1 (shared/reference/lambda-cloud-openapi.json), for tests and demos.

The API as the spec and Lambda's docs describe it: replies wrapped in `{"data": ...}`, errors as
`{"error": {"code", "message"}}`, Bearer or Basic auth, the launch rate limit (429 within `launch_interval_s` of the
previous launch), insufficient capacity as 400 `instance-operations/launch/insufficient-capacity`, filesystems
listed at /file-systems but created and deleted at /filesystems, 400 `filesystems/filesystem-in-use` while an
instance mounts one, statuses booting -> active -> terminating -> terminated, no stop, per-minute billing from
active until terminate. Faults (429, 5xx, timeouts, lost answers) come from emulator/server.py (`api.inject`).

Instances boot with their user data. `TrainerBoot` plays cloud-init and Docker on this machine: it reads our
`#cloud-config` (write_files + `docker run`), and when the image is the trainer's it runs `python -m training`
as a local process with the env file's variables, the filesystem as a directory that outlives instances
(`<root>/filesystems/<id>`; the instance disk `<root>/disks/<instance id>` otherwise), and the container path
(/workspace) rewritten to that directory in every value that names it, as emulator/pods.py does for RunPod.
`--restart on-failure` is honoured (a crashed trainer is started again while the instance is active). The one
addition inside the "container": LAMBDA_API_BASE_URL, pointing the trainer back at this emulator.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from emulator.pods import ENV_FAULT_HANG, ENV_FAULT_PROBE, HOST_VARIABLES, PodFaults
from emulator.server import ApiError, JsonApi, Request
from infra.config import DEFAULT_REPOSITORY
from infra.lambda_backend.catalog import LAMBDA_INSTANCE_TYPES, LAMBDA_REGIONS
from infra.paths import REPO_ROOT

DEFAULT_CODES = {400: "global/invalid-parameters", 401: "global/invalid-api-key", 403: "global/account-inactive",
                 404: "global/object-does-not-exist", 429: "global/too-many-requests", 500: "global/internal-error",
                 502: "global/internal-error", 503: "global/internal-error", 504: "global/internal-error"}
NOT_FOUND = "global/object-does-not-exist"
INVALID = "global/invalid-parameters"
USER_DATA_MAX_BYTES = 1024 * 1024
_HOSTNAME = re.compile(r"^[a-z0-9][0-9a-z-]{0,62}$")
_FS_NAME = re.compile(r"^[a-zA-Z]+[0-9a-zA-Z-]*$")
_TAG_KEY = re.compile(r"^[a-z][a-z0-9-:]+$")
_MOUNT = re.compile(r"^(/home|/lambda/nfs|/data)[//a-zA-Z0-9-]*$")


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _region(name: str) -> dict:
    return {"name": name, "description": name}


@dataclass
class InstanceRecord:
    id: str
    name: str
    type_name: str
    region: str
    ssh_key_names: list[str]
    filesystems: list[dict]  # the Filesystem JSON of each mounted one, with its mount point
    user_data: str
    tags: list[dict]
    status: str = "booting"
    hostname: str = ""
    ip: str = ""
    active_since: float | None = None
    billed_minutes: int = 0  # whole minutes of the stretches that have ended
    logs: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        kind = LAMBDA_INSTANCE_TYPES[self.type_name]
        return {
            "id": self.id, "name": self.name, "ip": self.ip, "private_ip": "10.0.0.2", "status": self.status,
            "ssh_key_names": self.ssh_key_names, "file_system_names": [fs["name"] for fs in self.filesystems],
            "file_system_mounts": [{"mount_point": fs["mount_point"], "file_system_id": fs["id"]} for fs in self.filesystems],
            "region": _region(self.region),
            "instance_type": _instance_type(kind.name),
            "hostname": self.hostname,
            "actions": {action: {"available": self.status == "active"}
                        for action in ("migrate", "rebuild", "restart", "cold_reboot", "terminate")},
            "tags": self.tags,
        }


def _instance_type(name: str) -> dict:
    kind = LAMBDA_INSTANCE_TYPES[name]
    gpu = f"{kind.gpu.removeprefix('NVIDIA ')} ({kind.memory_gb} GB)"
    return {"name": kind.name, "description": f"{kind.gpu_count}x {gpu}", "gpu_description": gpu,
            "price_cents_per_hour": round(kind.usd_per_hour * 100),
            "specs": {"vcpus": 8 * kind.gpu_count, "memory_gib": 64 * kind.gpu_count, "storage_gib": 512, "gpus": kind.gpu_count}}


class BootRuntime:
    """What an instance runs once booted. This one runs nothing: a booted instance is simply active."""

    api: LambdaCloudApi

    def bind(self, api: LambdaCloudApi) -> None:
        self.api = api

    def on_active(self, instance: InstanceRecord) -> None:
        """The instance passed its health checks: cloud-init runs the user data now."""

    def on_terminate(self, instance: InstanceRecord, done: Callable[[], None]) -> None:
        """The VM is shutting down: stop what runs, then call `done()` (the instance becomes terminated)."""
        done()


class LambdaCloudApi(JsonApi):
    def __init__(self, api_key: str | None = None, runtime: BootRuntime | None = None, *, boot_seconds: float = 0.0,
                 launch_interval_s: float = 12.0, ssh_keys: tuple[str, ...] | None = None,
                 capacity: dict[str, tuple[str, ...]] | None = None, clock: Callable[[], float] = time.monotonic):
        """`capacity`: instance type -> regions with capacity (default: every type everywhere). `ssh_keys`: the
        names registered in the account (None: any name)."""
        super().__init__()
        self.api_key = api_key
        self.runtime = runtime or BootRuntime()
        self.runtime.bind(self)
        self.boot_seconds = boot_seconds
        self.launch_interval_s = launch_interval_s
        self.ssh_keys = ssh_keys
        self.capacity = capacity
        self.clock = clock
        self.instances: dict[str, InstanceRecord] = {}
        self.ended: dict[str, InstanceRecord] = {}  # terminated: gone from the API, kept for tests' bills
        self.filesystems: dict[str, dict] = {}
        self.request_bodies: list[tuple[str, str, object]] = []  # (method, path, body) of every request
        self._last_launch = float("-inf")
        self.route("GET", "/api/v1/instances", lambda r: {"data": [i.to_json() for i in self.instances.values()]})
        self.route("GET", "/api/v1/instances/{id}", lambda r: {"data": self._instance(r.params["id"]).to_json()})
        self.route("POST", "/api/v1/instances/{id}", self.rename)
        self.route("GET", "/api/v1/instance-types", self.instance_types)
        self.route("POST", "/api/v1/instance-operations/launch", self.launch)
        self.route("POST", "/api/v1/instance-operations/terminate", self.terminate_request)
        self.route("GET", "/api/v1/file-systems", lambda r: {"data": list(self.filesystems.values())})
        self.route("POST", "/api/v1/filesystems", self.create_filesystem)
        self.route("DELETE", "/api/v1/filesystems/{id}", self.delete_filesystem)

    # --- the vendor's shapes ---
    def error_body(self, status: int, detail: str, errors: list[str]) -> object:
        """`errors[0]`, when given, is the error code (ApiError(400, message, [code]))."""
        code = errors[0] if errors else DEFAULT_CODES.get(status, "global/internal-error")
        suggestion = "Check your API key." if status == 401 else "See the Lambda Cloud API documentation."
        return {"error": {"code": code, "message": detail, "suggestion": suggestion}}

    def authorize(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme == "Basic":
            try:
                credential = base64.b64decode(credential).decode().removesuffix(":")
            except ValueError:
                credential = ""
        elif scheme != "Bearer":
            credential = ""
        if not credential or (self.api_key is not None and credential != self.api_key):
            raise ApiError(401, "Invalid API key.", ["global/invalid-api-key"])

    def dispatch(self, request: Request):
        with self.lock:
            self.request_bodies.append((request.method, request.path, request.body))
        return super().dispatch(request)

    # --- instances ---
    def _instance(self, instance_id: str) -> InstanceRecord:
        with self.lock:
            if instance_id not in self.instances:
                raise ApiError(404, "Instance not found.", [NOT_FOUND])
            return self.instances[instance_id]

    def rename(self, request: Request) -> dict:
        body = request.body if isinstance(request.body, dict) else {}
        name = body.get("name")
        if not isinstance(name, str) or len(name) > 64:
            raise ApiError(400, "name must be a string of 64 characters at most.", [INVALID])
        with self.lock:
            instance = self._instance(request.params["id"])
            instance.name = name
            return {"data": instance.to_json()}

    def instance_types(self, request: Request) -> dict:
        return {"data": {name: {"instance_type": _instance_type(name),
                                "regions_with_capacity_available": [_region(r) for r in self._regions_with_capacity(name)]}
                         for name in LAMBDA_INSTANCE_TYPES}}

    def _regions_with_capacity(self, type_name: str) -> tuple[str, ...]:
        return LAMBDA_REGIONS if self.capacity is None else self.capacity.get(type_name, ())

    def launch(self, request: Request) -> dict:
        body = request.body
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", [INVALID])
        problems = [f"{key} is required" for key in ("region_name", "instance_type_name", "ssh_key_names") if key not in body]
        if problems:
            raise ApiError(400, "; ".join(problems), [INVALID])
        region, type_name, keys = body["region_name"], body["instance_type_name"], body["ssh_key_names"]
        if region not in LAMBDA_REGIONS:
            raise ApiError(400, f"Unknown region {region!r}.", [INVALID])
        if type_name not in LAMBDA_INSTANCE_TYPES:
            raise ApiError(404, f"Instance type {type_name!r} not found.", [NOT_FOUND])
        if not (isinstance(keys, list) and len(keys) == 1):
            raise ApiError(400, "Exactly one SSH key must be specified.", [INVALID])
        if self.ssh_keys is not None and keys[0] not in self.ssh_keys:
            raise ApiError(404, f"SSH key {keys[0]!r} not found.", [NOT_FOUND])
        name = body.get("name", "")
        if not isinstance(name, str) or len(name) > 64:
            raise ApiError(400, "name must be 64 characters or fewer.", [INVALID])
        hostname = body.get("hostname")
        if hostname is not None and not (isinstance(hostname, str) and _HOSTNAME.match(hostname)):
            raise ApiError(400, f"Invalid hostname {hostname!r}.", [INVALID])
        user_data = body.get("user_data", "")
        if not isinstance(user_data, str) or len(user_data.encode()) > USER_DATA_MAX_BYTES:
            raise ApiError(400, "user_data must be plain text of at most 1MB.", [INVALID])
        tags = body.get("tags", [])
        if not isinstance(tags, list) or any(not (isinstance(t, dict) and _TAG_KEY.match(str(t.get("key", "")))
                                                  and isinstance(t.get("value"), str)) for t in tags):
            raise ApiError(400, "Invalid tags.", [INVALID])
        with self.lock:
            mounted = self._filesystems_for_launch(body, region)
            now = self.clock()
            if now - self._last_launch < self.launch_interval_s:
                raise ApiError(429, "Too many launch requests: at most one every 12 seconds.", ["global/too-many-requests"])
            if region not in self._regions_with_capacity(type_name):
                raise ApiError(400, "Not enough capacity to fulfill launch request.",
                               ["instance-operations/launch/insufficient-capacity"])
            self._last_launch = now
            instance_id = secrets.token_hex(16)
            instance = self.instances[instance_id] = InstanceRecord(
                instance_id, name, type_name, region, list(keys), mounted, user_data, [dict(t) for t in tags],
                hostname=hostname or f"ip-{len(self.instances) + len(self.ended) + 10}",
                ip=f"198.51.100.{len(self.instances) % 250 + 2}",
            )
            for fs in mounted:
                self.filesystems[fs["id"]]["is_in_use"] = True
        threading.Thread(target=self._boot, args=(instance_id,), name=f"boot-{instance_id}", daemon=True).start()
        return {"data": {"instance_ids": [instance.id]}}

    def _filesystems_for_launch(self, body: dict, region: str) -> list[dict]:
        by_name = {fs["name"]: fs for fs in self.filesystems.values()}
        mounted: dict[str, dict] = {}
        for name in body.get("file_system_names", []):
            if name not in by_name:
                raise ApiError(404, f"Filesystem {name!r} not found.", [NOT_FOUND])
            mounted[by_name[name]["id"]] = {**by_name[name]}
        for entry in body.get("file_system_mounts", []):
            fs = self.filesystems.get(entry.get("file_system_id"))
            if fs is None:
                raise ApiError(404, "Filesystem not found.", [NOT_FOUND])
            if not _MOUNT.match(str(entry.get("mount_point", ""))):
                raise ApiError(400, "mount_point must be under /home, /lambda/nfs or /data.", [INVALID])
            mounted[fs["id"]] = {**fs, "mount_point": entry["mount_point"]}
        for fs in mounted.values():
            if fs["region"]["name"] != region:
                raise ApiError(400, f"Filesystem {fs['name']!r} is in {fs['region']['name']}, not {region}.",
                               ["instance-operations/launch/file-system-in-wrong-region"])
        return list(mounted.values())

    def _boot(self, instance_id: str) -> None:
        if self.boot_seconds:
            time.sleep(self.boot_seconds)
        with self.lock:
            instance = self.instances.get(instance_id)
            if instance is None or instance.status != "booting":
                return
            instance.status = "active"
            instance.active_since = self.clock()
        self.runtime.on_active(instance)

    def terminate_request(self, request: Request) -> dict:
        body = request.body if isinstance(request.body, dict) else {}
        ids = body.get("instance_ids")
        if not isinstance(ids, list) or not ids:
            raise ApiError(400, "instance_ids is required.", [INVALID])
        with self.lock:
            instances = [self._instance(instance_id) for instance_id in ids]  # 404 before anything is terminated
            answer = [instance.to_json() | {"status": "terminating"} for instance in instances]
        for instance in instances:
            self.terminate(instance.id)
        return {"data": {"terminated_instances": answer}}

    def terminate(self, instance_id: str) -> None:
        """Terminate from the emulator's side too (a lost host): billing ends now, the VM shuts down."""
        with self.lock:
            instance = self.instances.get(instance_id)
            if instance is None or instance.status in ("terminating", "terminated"):
                return
            self._close_bill(instance)
            instance.status = "terminating"
        self.runtime.on_terminate(instance, lambda: self._terminated(instance_id))

    def _terminated(self, instance_id: str) -> None:
        with self.lock:
            instance = self.instances.pop(instance_id, None)
            if instance is None:
                return
            instance.status = "terminated"
            self.ended[instance_id] = instance
            still_mounted = {fs["id"] for other in self.instances.values() for fs in other.filesystems}
            for fs in instance.filesystems:
                if fs["id"] in self.filesystems and fs["id"] not in still_mounted:
                    self.filesystems[fs["id"]]["is_in_use"] = False

    # --- billing: per minute, from active until terminate ---
    def _close_bill(self, instance: InstanceRecord) -> None:
        if instance.active_since is not None:
            instance.billed_minutes += math.ceil((self.clock() - instance.active_since) / 60)
            instance.active_since = None

    def billing(self) -> list[str]:
        """Instances billed right now: after a finished run or a destroy, none."""
        with self.lock:
            return [i.id for i in self.instances.values() if i.status in ("booting", "active", "unhealthy")]

    def record(self, instance_id: str) -> InstanceRecord:
        with self.lock:
            return self.instances.get(instance_id) or self.ended[instance_id]

    # --- filesystems ---
    def create_filesystem(self, request: Request) -> dict:
        body = request.body if isinstance(request.body, dict) else {}
        name, region = body.get("name"), body.get("region")
        if not (isinstance(name, str) and len(name) <= 60 and _FS_NAME.match(name)):
            raise ApiError(400, f"Invalid filesystem name {name!r}.", [INVALID])
        if region not in LAMBDA_REGIONS:
            raise ApiError(400, f"Unknown region {region!r}.", [INVALID])
        with self.lock:
            if any(fs["name"] == name for fs in self.filesystems.values()):
                raise ApiError(400, f"A filesystem named {name!r} already exists.", ["global/duplicate"])
            filesystem_id = secrets.token_hex(16)
            filesystem = self.filesystems[filesystem_id] = {
                "id": filesystem_id, "name": name, "mount_point": f"/lambda/nfs/{name}", "created": _now_iso(),
                "created_by": {"id": "user0", "email": "user@example.com", "status": "active"},
                "is_in_use": False, "region": _region(region), "bytes_used": 0,
            }
            return {"data": filesystem}

    def delete_filesystem(self, request: Request) -> dict:
        with self.lock:
            filesystem = self.filesystems.get(request.params["id"])
            if filesystem is None:
                raise ApiError(404, "Filesystem not found.", [NOT_FOUND])
            if filesystem["is_in_use"]:
                raise ApiError(400, "The filesystem is in use: terminate the instances that mount it first.",
                               ["filesystems/filesystem-in-use"])
            del self.filesystems[filesystem["id"]]
        return {"data": {"deleted_ids": [filesystem["id"]]}}


# --- the boot: cloud-init and Docker, played on this machine ---


@dataclass
class ContainerSpec:
    """What our user data asks cloud-init and Docker to run."""

    image: str
    env: dict[str, str]
    volumes: list[tuple[str, str]]  # (host path, container path)
    restart_on_failure: bool


def read_user_data(user_data: str) -> ContainerSpec | None:
    """The `docker run` of a `#cloud-config` document (its --env-file from write_files); None when there is none."""
    if not user_data.startswith("#cloud-config"):
        return None
    document = yaml.safe_load(user_data) or {}
    files = {entry["path"]: entry.get("content", "") for entry in document.get("write_files", [])}
    for command in document.get("runcmd", []):
        words = shlex.split(command) if isinstance(command, str) else list(command)
        if words[:2] == ["sh", "-c"]:
            words = shlex.split(words[2])
        if words[:2] != ["docker", "run"]:
            continue
        env: dict[str, str] = {}
        volumes: list[tuple[str, str]] = []
        restart = False
        rest = iter(words[2:])
        for word in rest:
            if word in ("--env-file",):
                for line in files.get(next(rest), "").splitlines():
                    if line and not line.startswith("#"):
                        name, _, value = line.partition("=")
                        env[name] = value
            elif word in ("-e", "--env"):
                name, _, value = next(rest).partition("=")
                env[name] = value
            elif word in ("-v", "--volume"):
                host, _, container = next(rest).partition(":")
                volumes.append((host, container.split(":")[0]))
            elif word == "--restart":
                restart = next(rest).startswith("on-failure")
            elif word in ("--name", "--gpus", "--shm-size", "--ipc"):
                next(rest)
            elif word.startswith("-"):
                continue
            else:
                return ContainerSpec(word, env, volumes, restart)
    return None


@dataclass
class _Container:
    process: subprocess.Popen
    done: threading.Event = field(default_factory=threading.Event)


class TrainerBoot(BootRuntime):
    """Runs our trainer image's entrypoint as a local process (see the module docstring)."""

    def __init__(self, root: Path, *, python: str = sys.executable, stop_grace_s: float = 10.0,
                 restart_delay_s: float = 1.0, extra_env: dict[str, str] | None = None,
                 seed_filesystem: Callable[[Path], None] | None = None, faults: PodFaults | None = None):
        self.root = Path(root)
        self.python, self.stop_grace_s, self.restart_delay_s = python, stop_grace_s, restart_delay_s
        self.extra_env = dict(extra_env or {})
        self.seed_filesystem = seed_filesystem
        self.faults = faults or PodFaults()
        self.base_url: str | None = None  # the emulator's own address: set before the first instance boots
        self._containers: dict[str, _Container] = {}
        self._lost: set[str] = set()
        self._lock = threading.RLock()

    def filesystem_dir(self, filesystem_id: str) -> Path:
        return self.root / "filesystems" / filesystem_id

    def disk_dir(self, instance_id: str) -> Path:
        return self.root / "disks" / instance_id

    def host_dir(self, instance: InstanceRecord, host_path: str) -> Path:
        """The directory standing in for a path on the VM: a mounted filesystem's, or the instance's own disk."""
        for fs in instance.filesystems:
            if host_path == fs["mount_point"] or host_path.startswith(fs["mount_point"] + "/"):
                return self.filesystem_dir(fs["id"]) / host_path[len(fs["mount_point"]):].lstrip("/")
        return self.disk_dir(instance.id) / host_path.lstrip("/")

    def on_active(self, instance: InstanceRecord) -> None:
        spec = read_user_data(instance.user_data)
        if spec is None or spec.image.split("@")[0].rsplit(":", 1)[0] != DEFAULT_REPOSITORY:
            return  # not our trainer: the instance idles, billed, as a real one would
        self._spawn(instance, spec)

    def _environment(self, instance: InstanceRecord, spec: ContainerSpec) -> dict[str, str]:
        if not self.base_url:
            raise RuntimeError("TrainerBoot.base_url is not set: the trainer could not reach the API to terminate itself")
        env = {name: os.environ[name] for name in HOST_VARIABLES if name in os.environ}
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        values = dict(spec.env)
        for host_path, container_path in spec.volumes:
            directory = self.host_dir(instance, host_path)
            fresh = not directory.exists()
            directory.mkdir(parents=True, exist_ok=True)
            if fresh and self.seed_filesystem is not None and instance.filesystems:
                self.seed_filesystem(directory)
            pattern = re.compile(r'(^|")' + re.escape(container_path.rstrip("/")) + r'(?=/|"|$)')
            values = {name: pattern.sub(functools.partial(_mounted, str(directory)), value) for name, value in values.items()}
        env.update(values)
        env["LAMBDA_API_BASE_URL"] = self.base_url
        if self.faults.hang_after_step is not None:
            env[ENV_FAULT_HANG] = str(self.faults.hang_after_step)
        if self.faults.probe_steps:
            env[ENV_FAULT_PROBE] = "1"
        env.update(self.extra_env)
        return env

    def _spawn(self, instance: InstanceRecord, spec: ContainerSpec) -> None:
        module = "emulator.pod_process" if self.faults.any else "training"
        process = subprocess.Popen([self.python, "-m", module], cwd=REPO_ROOT, env=self._environment(instance, spec),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", start_new_session=True)
        container = _Container(process)
        with self._lock:
            self._containers[instance.id] = container
        threading.Thread(target=self._follow, args=(instance, spec, container), daemon=True).start()

    def _follow(self, instance: InstanceRecord, spec: ContainerSpec, container: _Container) -> None:
        assert container.process.stdout is not None  # started with stdout=PIPE
        for line in container.process.stdout:
            with self.api.lock:
                instance.logs.append(line.rstrip("\n"))
        code = container.process.wait()
        container.done.set()
        with self.api.lock:
            instance.logs.append(f"container exited with code {code}")
            again = spec.restart_on_failure and code != 0 and instance.status == "active"
        with self._lock:
            again = again and instance.id not in self._lost
        if again:
            time.sleep(self.restart_delay_s)
            with self.api.lock:
                again = instance.status == "active"
            if again:
                self._spawn(instance, spec)

    def on_terminate(self, instance: InstanceRecord, done: Callable[[], None]) -> None:
        """The VM shuts down: Docker stops the container (SIGTERM, SIGKILL after the grace), then it is gone. Not
        waited for here: the trainer itself may be the caller (its own terminate request)."""
        container = self._containers.get(instance.id)

        def shut_down() -> None:
            if container is not None and not container.done.wait(0.5):
                self._signal(container, signal.SIGTERM)
                if not container.done.wait(self.stop_grace_s):
                    self._signal(container, signal.SIGKILL)
                    container.done.wait(10)
            done()

        threading.Thread(target=shut_down, name=f"shutdown-{instance.id}", daemon=True).start()

    @staticmethod
    def _signal(container: _Container, signum: int) -> None:
        try:
            os.killpg(container.process.pid, signum)
        except ProcessLookupError:
            pass

    # --- what tests do to instances ---
    def lose_instance(self, instance_id: str) -> list[str]:
        """The host is gone (hardware failure): the trainer dies with no signal to act on, and the instance with it.
        Returns the instance's log as it was when the trainer died."""
        with self._lock:
            self._lost.add(instance_id)  # nothing restarts its container
        container = self._containers.get(instance_id)
        if container is not None:
            self._signal(container, signal.SIGKILL)
            container.done.wait(10)
        with self.api.lock:
            log = list(self.api.instances[instance_id].logs)
        self.api.terminate(instance_id)
        return log

    def kill_container(self, instance_id: str) -> None:
        """SIGKILL the trainer (an OOM kill): the instance stays active and Docker restarts the container."""
        container = self._containers.get(instance_id)
        if container is not None and container.process.poll() is None:
            self._signal(container, signal.SIGKILL)

    def wait_until_terminated(self, instance_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.api.lock:
                gone = instance_id not in self.api.instances
            container = self._containers.get(instance_id)
            if gone and (container is None or container.done.is_set()):
                return True
            time.sleep(0.1)
        return False

    def shutdown(self) -> None:
        for container in list(self._containers.values()):
            self._signal(container, signal.SIGKILL)
        for container in list(self._containers.values()):
            container.done.wait(10)


def _mounted(source: str, match: re.Match[str]) -> str:
    """A mount's container path in an environment value, replaced by its host directory (the quote before it kept)."""
    return match.group(1) + source
