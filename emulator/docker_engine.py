"""An emulator of the Docker Engine API subset the `docker` SDK uses to run a lorastack container.

Shapes follow the Engine API's swagger (moby/moby api/swagger.yaml): `/_ping`, `/version`, `/images/{name}/json`,
`/images/create` (pull), `/containers/create`, `/containers/{id}/start|wait|stop|kill|json|logs`,
`DELETE /containers/{id}` and `/containers/json` with label and name filters, each also under a `/v1.xx` prefix as
the SDK sends them; errors are `{"message": ...}` with the engine's statuses (404 no such container or image, 409 a
name in use or a running container removed without force, 304 already started or stopped). Tests point the SDK at
it with DOCKER_HOST=tcp://127.0.0.1:<port>; `emulator.server` brings routing and fault injection (429, 5xx, slow
and lost answers).

A container of the trainer image runs the real trainer, `python -m training` (or emulator.pod_process when a test
asks for faults, as on the RunPod emulator), as a local process: the container's Env, plus the host variables a
container would have; its bind mount (`HostConfig.Binds`, `<folder>:/workspace`) is a real folder here, and the
mount path is rewritten to it in every variable that names it (a process cannot be given a mount): the one
liberty taken. No GPU is given (DeviceRequests are recorded): the tiny model trains on the CPU. Restart policy
`no` is honoured (nothing restarts an exited container). `docker stop` sends SIGTERM, then SIGKILL after its
timeout; a process ended by signal N exits 128+N, as in a container. Other images are only marked running.
"""

from __future__ import annotations

import builtins
import functools
import json
import os
import re
import secrets
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from emulator.pods import (
    ENV_FAULT_HANG,
    ENV_FAULT_PROBE,
    ENV_FAULT_QUOTA_FILE,
    ENV_FAULT_VOLUME,
    HOST_VARIABLES,
    PodFaults,
)
from emulator.server import ApiError, JsonApi, Request, Response
from infra.config import DEFAULT_REPOSITORY
from infra.paths import REPO_ROOT

API_VERSION = "1.47"
ENGINE_VERSION = "27.5.1"
ZERO_TIME = "0001-01-01T00:00:00Z"
STDOUT = 1


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Container:
    id: str
    name: str
    config: dict  # the create body (ContainerConfig + HostConfig)
    created: str = field(default_factory=now_iso)
    status: str = "created"  # created | running | exited
    exit_code: int = 0
    started_at: str = ZERO_TIME
    finished_at: str = ZERO_TIME
    logs: list[bytes] = field(default_factory=list)
    process: subprocess.Popen | None = None
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def labels(self) -> dict[str, str]:
        return self.config.get("Labels") or {}

    @property
    def host_config(self) -> dict:
        return self.config.get("HostConfig") or {}

    def state(self) -> dict:
        return {
            "Status": self.status, "Running": self.status == "running", "Paused": False, "Restarting": False,
            "OOMKilled": False, "Dead": False, "Pid": self.process.pid if self.status == "running" and self.process else 0,
            "ExitCode": self.exit_code, "Error": "", "StartedAt": self.started_at, "FinishedAt": self.finished_at,
        }

    def mounts(self) -> list[dict]:
        mounts = []
        for bind in self.host_config.get("Binds") or []:
            source, destination, *mode = bind.split(":")
            mounts.append({"Type": "bind", "Source": source, "Destination": destination, "Mode": (mode or ["rw"])[0],
                           "RW": (mode or ["rw"])[0] != "ro", "Propagation": "rprivate"})
        return mounts

    def inspect(self) -> dict:
        config = {key: value for key, value in self.config.items() if key not in ("HostConfig", "NetworkingConfig")}
        return {
            "Id": self.id, "Created": self.created, "Path": "python", "Args": ["-m", "training"], "State": self.state(),
            "Image": "sha256:" + "0" * 64, "Name": "/" + self.name, "RestartCount": 0, "Driver": "overlay2",
            "HostConfig": self.host_config, "Mounts": self.mounts(),
            "Config": {"Tty": False, "OpenStdin": False, "Env": [], "Labels": {}, "Cmd": None, **config},
        }

    def summary(self) -> dict:
        return {
            "Id": self.id, "Names": ["/" + self.name], "Image": self.config.get("Image"), "ImageID": "sha256:" + "0" * 64,
            "Command": "python -m training", "Created": int(time.time()), "State": self.status,
            "Status": "Up" if self.status == "running" else f"Exited ({self.exit_code})", "Labels": self.labels,
            "Mounts": self.mounts(), "HostConfig": {"NetworkMode": "default"},
        }


class DockerEngineApi(JsonApi):
    def __init__(self, *, run_trainers: bool = True, trainer_repositories: tuple[str, ...] = (DEFAULT_REPOSITORY,),
                 python: str = sys.executable, extra_env: dict[str, str] | None = None,
                 faults: PodFaults | None = None):
        super().__init__()
        self.run_trainers = run_trainers
        self.trainer_repositories = trainer_repositories
        self.python = python
        self.extra_env = dict(extra_env or {})
        self.faults = faults or PodFaults()
        self.images: set[str] = set()
        self.containers: dict[str, Container] = {}
        self.sent: list[Request] = []  # every request as it came, for the contract test
        for prefix in ("", "/v{version}"):
            self.route("GET", prefix + "/_ping", self.ping)
            self.route("HEAD", prefix + "/_ping", self.ping)
            self.route("GET", prefix + "/version", self.version)
            self.route("GET", prefix + "/images/{name:path}/json", self.inspect_image)
            self.route("POST", prefix + "/images/create", self.pull)
            self.route("POST", prefix + "/containers/create", self.create)
            self.route("GET", prefix + "/containers/json", self.list)
            self.route("GET", prefix + "/containers/{id}/json", self.inspect)
            self.route("GET", prefix + "/containers/{id}/logs", self.logs)
            self.route("POST", prefix + "/containers/{id}/start", self.start)
            self.route("POST", prefix + "/containers/{id}/wait", self.wait)
            self.route("POST", prefix + "/containers/{id}/stop", self.stop)
            self.route("POST", prefix + "/containers/{id}/kill", self.kill)
            self.route("DELETE", prefix + "/containers/{id}", self.remove)

    def error_body(self, status: int, detail: str, errors: list[str]) -> object:
        return {"message": detail}

    def dispatch(self, request: Request) -> Response:
        with self.lock:
            self.sent.append(request)
        return super().dispatch(request)

    # -- lookups ------------------------------------------------------------------------------------------------
    def find(self, reference: str) -> Container:
        with self.lock:
            for container in self.containers.values():
                if reference in (container.id, container.name, "/" + container.name):
                    return container
            matches = [c for c in self.containers.values() if c.id.startswith(reference)]
        if len(matches) != 1:
            raise ApiError(404, f"No such container: {reference}")
        return matches[0]

    def is_trainer(self, image: str) -> bool:
        reference = image.split("@", 1)[0]
        if ":" in reference.rsplit("/", 1)[-1]:
            reference = reference.rsplit(":", 1)[0]
        return reference in self.trainer_repositories

    # -- system and images --------------------------------------------------------------------------------------
    def ping(self, request: Request) -> Response:
        return Response(200, headers={"API-Version": API_VERSION}, stream=iter([b"OK"]))

    def version(self, request: Request) -> dict:
        return {"Version": ENGINE_VERSION, "ApiVersion": API_VERSION, "MinAPIVersion": "1.24", "Os": "linux",
                "Arch": "amd64", "KernelVersion": os.uname().release, "GoVersion": "go1.22", "GitCommit": "emulator"}

    def inspect_image(self, request: Request) -> dict:
        name = request.params["name"]
        if name not in self.images:
            raise ApiError(404, f"No such image: {name}")
        return {"Id": "sha256:" + "0" * 64, "RepoTags": [name.split("@")[0]], "RepoDigests": [], "Os": "linux",
                "Architecture": "amd64", "Config": {"Env": [], "Cmd": ["python", "-m", "training"]}}

    def pull(self, request: Request) -> Response:
        image, tag = request.query.get("fromImage", ""), request.query.get("tag", "")
        reference = f"{image}{'@' if tag.startswith('sha256:') else ':'}{tag}" if tag else image
        if not self.is_trainer(reference):
            raise ApiError(404, f"pull access denied for {image}, repository does not exist or may require 'docker login'")
        with self.lock:
            self.images.add(reference)
        lines = [{"status": f"Pulling from {image}", "id": tag}, {"status": f"Digest: sha256:{'0' * 64}"},
                 {"status": f"Status: Downloaded newer image for {reference}"}]
        return Response(200, stream=iter([json.dumps(line).encode() + b"\r\n" for line in lines]))

    # -- containers ----------------------------------------------------------------------------------------------
    def create(self, request: Request) -> Response:
        body = request.body if isinstance(request.body, dict) else {}
        image = body.get("Image") or ""
        name = request.query.get("name") or secrets.token_hex(6)
        if image not in self.images:
            raise ApiError(404, f"No such image: {image}")
        with self.lock:
            clash = next((c for c in self.containers.values() if c.name == name), None)
            if clash is not None:
                raise ApiError(409, f'Conflict. The container name "/{name}" is already in use by container '
                                    f'"{clash.id}". You have to remove (or rename) that container to be able to reuse that name.')
            container = Container(secrets.token_hex(32), name, body)
            self.containers[container.id] = container
        return Response(201, {"Id": container.id, "Warnings": []})

    def list(self, request: Request) -> list[dict]:
        filters = json.loads(request.query.get("filters") or "{}")
        every = request.query.get("all") in ("1", "true", "True")
        with self.lock:
            found = [c for c in self.containers.values() if every or c.status == "running"]
        for wanted in _filter_values(filters.get("label")):
            key, _, value = wanted.partition("=")
            found = [c for c in found if key in c.labels and (not value or c.labels[key] == value)]
        for wanted in _filter_values(filters.get("name")):
            found = [c for c in found if re.search(wanted, "/" + c.name)]  # the engine matches names as a pattern
        return [c.summary() for c in found]

    def inspect(self, request: Request) -> dict:
        return self.find(request.params["id"]).inspect()

    def start(self, request: Request) -> Response:
        container = self.find(request.params["id"])
        with self.lock:
            if container.status == "running":
                return Response(304)
            container.status, container.started_at = "running", now_iso()
            container.finished_at, container.exit_code = ZERO_TIME, 0
            container.ended.clear()
        if self.run_trainers and self.is_trainer(container.config.get("Image", "")):
            self._spawn(container)
        return Response(204)

    def wait(self, request: Request) -> dict:
        container = self.find(request.params["id"])
        if container.status == "running":
            container.ended.wait()
        return {"StatusCode": container.exit_code, "Error": None}

    def stop(self, request: Request) -> Response:
        container = self.find(request.params["id"])
        if container.status != "running":
            return Response(304)
        self._end(container, float(request.query.get("t") or 10))
        return Response(204)

    def kill(self, request: Request) -> Response:
        container = self.find(request.params["id"])
        if container.status != "running":
            raise ApiError(409, f"Cannot kill container: {container.id}: container {container.id} is not running")
        signum = request.query.get("signal") or "SIGKILL"
        self.signal(container, getattr(signal, signum) if not signum.isdigit() else int(signum))
        return Response(204)

    def remove(self, request: Request) -> Response:
        container = self.find(request.params["id"])
        if container.status == "running":
            if request.query.get("force") not in ("1", "true", "True"):
                raise ApiError(409, f"cannot remove container \"/{container.name}\": container is running: stop the "
                                    "container before removing or force remove")
            self._end(container, 0)
        with self.lock:
            self.containers.pop(container.id, None)
        return Response(204)

    def logs(self, request: Request) -> Response:
        container = self.find(request.params["id"])
        follow = request.query.get("follow") in ("1", "true", "True")

        def frames() -> Iterator[bytes]:
            sent = 0
            while True:
                with self.lock:
                    pending, sent = container.logs[sent:], len(container.logs)
                for line in pending:
                    yield struct.pack(">BxxxL", STDOUT, len(line)) + line
                if not follow or (container.status != "running" and sent == len(container.logs)):
                    return
                time.sleep(0.05)

        return Response(200, stream=frames())

    # -- what tests do ----------------------------------------------------------------------------------------------
    def signal(self, container: Container, signum: int) -> None:
        """Signal the container's process group (`docker kill`; SIGKILL: a machine gone, an OOM kill)."""
        process = container.process
        if process is None:
            self._exited(container, 128 + signum)
            return
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass

    def lines(self, container_id: str) -> builtins.list[str]:  # `list` here is the method below
        container = self.find(container_id)
        with self.lock:
            return [line.decode(errors="replace").rstrip("\n") for line in container.logs]

    def running(self) -> builtins.list[str]:
        with self.lock:
            return [c.id for c in self.containers.values() if c.status == "running"]

    def shutdown(self) -> None:
        for container in list(self.containers.values()):
            if container.status == "running":
                self.signal(container, signal.SIGKILL)
                container.ended.wait(10)

    # -- the process ----------------------------------------------------------------------------------------------
    def _environment(self, container: Container) -> dict[str, str]:
        env = {name: os.environ[name] for name in HOST_VARIABLES if name in os.environ}
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "HOSTNAME": container.id[:12]})
        declared = dict(entry.partition("=")[::2] for entry in container.config.get("Env") or [])
        for mount in container.mounts():
            pattern = re.compile(r'(^|")' + re.escape(mount["Destination"].rstrip("/")) + r'(?=/|"|$)')
            declared = {name: pattern.sub(functools.partial(_mounted, mount["Source"]), value)
                        for name, value in declared.items()}
        env.update(declared)
        faults, folder = self.faults, (container.mounts() or [{"Source": ""}])[0]["Source"]
        if faults.volume_quotas:
            env[ENV_FAULT_QUOTA_FILE] = str(Path(folder).parent / f".quota-{container.name}")
            env[ENV_FAULT_VOLUME] = folder
        if faults.hang_after_step is not None:
            env[ENV_FAULT_HANG] = str(faults.hang_after_step)
        if faults.probe_steps:
            env[ENV_FAULT_PROBE] = "1"
        env.update(self.extra_env)
        return env

    def _spawn(self, container: Container) -> None:
        module = "emulator.pod_process" if self.faults.any else "training"
        container.process = subprocess.Popen(
            [self.python, "-m", module], cwd=REPO_ROOT, env=self._environment(container), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        threading.Thread(target=self._follow, args=(container,), name=f"container-{container.name}", daemon=True).start()

    def _follow(self, container: Container) -> None:
        process = container.process
        assert process is not None and process.stdout is not None  # _spawn started it with stdout=PIPE
        for line in process.stdout:
            with self.lock:
                container.logs.append(line)
        code = process.wait()
        self._exited(container, 128 - code if code < 0 else code)  # killed by signal N: 128+N, as Docker reports

    def _exited(self, container: Container, code: int) -> None:
        with self.lock:
            container.status, container.exit_code, container.finished_at = "exited", code, now_iso()
        container.ended.set()

    def _end(self, container: Container, grace_s: float) -> None:
        """`docker stop`: SIGTERM, SIGKILL after `grace_s`; returns once the container has exited."""
        if container.process is None:
            self._exited(container, 0)
            return
        self.signal(container, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
        if not container.ended.wait(grace_s if grace_s > 0 else 10):
            self.signal(container, signal.SIGKILL)
            container.ended.wait(10)


def _filter_values(value: object) -> list[str]:
    """A filter's values: the SDK sends a list, older clients `{value: true}`."""
    if isinstance(value, dict):
        return [key for key, wanted in value.items() if wanted]
    if isinstance(value, str):
        return [value]
    return list(cast(Iterable[str], value or []))  # else a list of values, as the SDK sends


def _mounted(source: str, match: re.Match[str]) -> str:
    """A mount's container path in an environment value, replaced by its host directory (the quote before it kept)."""
    return match.group(1) + source
