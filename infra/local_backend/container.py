"""Container: the stack's trainer container on the user's Docker engine, as a Pulumi dynamic resource.

Create is `docker run` of the pinned image: every GPU (`--gpus all`, or gpuCount of them), the env a RunPod pod
gets, the stack's folder bind-mounted at /workspace, labels `lorastack.stack=<stack>` and `lorastack.managed=1`,
restart policy `no` (the trainer ends the run by exiting: nothing restarts it). A container's settings cannot
change once made, so every change replaces it, the old one first (never two trainers on one folder).

Retry-safe create: the engine refuses a second container of the same name, so after a lost answer the create
looks for the container by name; one carrying this create's inputs digest is adopted (started if it is only
created). A leftover that is ours, stopped and not of these inputs (a run killed outside Pulumi and dropped by
refresh) is removed first; a running one is refused, naming it.

Read: a container killed from outside (exit code above 128: SIGKILL, an OOM kill, a machine that went down) has
not finished its run, so refresh reports it gone and the next `up` starts a new one that resumes from the
folder's newest checkpoint. A container that exited by itself (done, failed, a limit) stays: `up` leaves it be.
Delete: `docker stop` (SIGTERM: the trainer checkpoints and exits) then remove.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import pulumi
from docker.errors import ImageNotFound, NotFound
from docker.types import DeviceRequest
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, DiffResult, ReadResult, ResourceProvider
from pulumi.dynamic.dynamic import PROVIDER_KEY

from contract.spec import ENV_MANAGED, WORKSPACE_MOUNT
from infra.config import is_pinned
from infra.dynamic import changed_keys, is_unknown, whole_numbers
from infra.local_backend import engine
from infra.local_backend.engine import INPUTS_LABEL, MANAGED_LABEL, STACK_LABEL

CONTAINER_KEYS = ("name", "stack", "image", "env", "folder", "gpus", "shmSizeGb", "user")
INTEGER_KEYS = ("shmSizeGb",)
STOP_TIMEOUT_S = 60  # SIGTERM, then SIGKILL: time for the trainer to write its checkpoint
KILLED_EXIT_CODES = range(129, 256)  # 128 + a signal number: ended from outside


def inputs_digest(props: dict[str, Any]) -> str:
    """What identifies this create's container: the digest of its inputs (secrets in env are hashed, not shown)."""
    inputs = {key: props.get(key) for key in CONTAINER_KEYS}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def was_killed(state: dict) -> bool:
    return state.get("Status") == "exited" and (state.get("OOMKilled") or state.get("ExitCode") in KILLED_EXIT_CODES)


class ContainerProvider(ResourceProvider):
    """Inputs: name, stack, image, env, folder, gpus ("all" or a count), shmSizeGb, user. Outputs add
    containerId, state, exitCode, startedAt (as of the last create or refresh)."""

    def __init__(self, retries: int = 6, backoff: float = 0.5, timeout: float = 60.0):
        super().__init__()
        self.retries, self.backoff, self.timeout = retries, backoff, timeout

    def _client(self):
        try:
            return engine.connect(os.environ, self.timeout)
        except engine.NoEngine as error:
            raise RuntimeError(str(error)) from None

    def _call(self, action):
        return engine.call(action, self.retries, self.backoff)

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        news = whole_numbers(news, INTEGER_KEYS)
        known = {key: value for key, value in news.items() if not is_unknown(value)}
        failures: list[CheckFailure] = []
        image = known.get("image")
        if image is not None and not (isinstance(image, str) and is_pinned(image)):
            failures.append(CheckFailure(
                "image", f"must be a pinned image reference (a version tag or @sha256 digest, never latest): {image!r}"
            ))
        folder = known.get("folder")
        if folder is not None and not (isinstance(folder, str) and os.path.isabs(folder)):
            failures.append(CheckFailure("folder", f"must be an absolute path on the engine's machine (got {folder!r})"))
        gpus = known.get("gpus", "all")
        if gpus != "all" and not (isinstance(gpus, (int, float)) and float(gpus).is_integer() and 1 <= gpus <= 8):
            failures.append(CheckFailure("gpus", f"must be all or 1 to 8 (got {gpus!r})"))
        env = known.get("env")
        if isinstance(env, dict) and env.get(ENV_MANAGED) != "1" and not is_unknown(env.get(ENV_MANAGED)):
            failures.append(CheckFailure("env", f"every lorastack container carries {ENV_MANAGED}=1 (the reaper's mark)"))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        olds, news = whole_numbers(olds, INTEGER_KEYS), whole_numbers(news, INTEGER_KEYS)
        replaces = changed_keys(olds, news, CONTAINER_KEYS)
        return DiffResult(changes=bool(replaces), replaces=replaces, delete_before_replace=True)

    def create(self, props: dict[str, Any]) -> CreateResult:
        props = whole_numbers(props, INTEGER_KEYS)
        client = self._client()
        os.makedirs(props["folder"], exist_ok=True)
        self._ensure_image(client, props["image"])
        digest = inputs_digest(props)
        container = None
        for attempt in range(self.retries + 1):
            container = self._existing(client, props, digest)
            if container is not None:
                break
            try:
                container = client.containers.create(**_create_arguments(props, digest))
                break
            except Exception as error:  # only transient ones are tried again, after a look
                if not engine.is_transient(error) or attempt == self.retries:
                    raise
                self._pause(attempt)
        assert container is not None  # the loop ends with a container, or raises
        if container.status == "created":
            self._call(container.start)
            self._call(container.reload)
        return CreateResult(container.id, _outputs(props, container.attrs))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        client = self._client()
        try:
            container = self._call(lambda: client.containers.get(id_))
        except NotFound:
            return ReadResult("", {})
        if was_killed(container.attrs["State"]):
            return ReadResult("", {})  # see the module docstring: the next `up` resumes in a new container
        return ReadResult(id_, _outputs(props, container.attrs))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        client = self._client()
        try:
            container = self._call(lambda: client.containers.get(id_))
            if container.status in ("running", "restarting", "paused"):
                self._call(lambda: container.stop(timeout=STOP_TIMEOUT_S))
            self._call(functools.partial(container.remove, force=True))
        except NotFound:
            pass  # already gone: what we wanted

    # -- create's pieces ------------------------------------------------------------------------------------------
    def _ensure_image(self, client, image: str) -> None:
        try:
            self._call(lambda: client.images.get(image))
        except ImageNotFound:
            self._call(lambda: client.images.pull(image))

    def _existing(self, client, props: dict[str, Any], digest: str):
        """This create's container from an earlier try; a stopped leftover of ours under the name is removed."""
        name = props["name"]
        found = self._call(lambda: client.containers.list(all=True, filters={"name": name, "label": f"{MANAGED_LABEL}=1"}))
        for container in found:
            if container.name != name:
                continue  # the name filter matches substrings
            if container.labels.get(INPUTS_LABEL) == digest and container.status in ("created", "running"):
                return container
            if container.status in ("running", "restarting", "paused"):
                raise RuntimeError(
                    f"container {name} ({container.short_id}) is running another configuration of stack "
                    f"{props['stack']}: `pulumi refresh`, or `docker stop {name}` first"
                )
            self._call(functools.partial(container.remove, force=True))
        return None

    def _pause(self, attempt: int) -> None:
        time.sleep(self.backoff * 2**attempt)


def _create_arguments(props: dict[str, Any], digest: str) -> dict[str, Any]:
    gpus = props.get("gpus", "all")
    arguments: dict[str, Any] = {
        "image": props["image"],
        "name": props["name"],
        "environment": dict(props["env"]),
        "labels": {STACK_LABEL: props["stack"], MANAGED_LABEL: "1", INPUTS_LABEL: digest},
        "volumes": {props["folder"]: {"bind": WORKSPACE_MOUNT, "mode": "rw"}},
        "device_requests": [DeviceRequest(count=-1 if gpus == "all" else int(gpus), capabilities=[["gpu"]])],
        "shm_size": f"{props['shmSizeGb']}g",
        "restart_policy": {"Name": "no"},
        "detach": True,
    }
    if props.get("user"):
        arguments["user"] = props["user"]  # files in the folder belong to the user, not root
    return arguments


def _outputs(props: dict[str, Any], attrs: dict) -> dict[str, Any]:
    state = attrs.get("State") or {}
    return {
        **{key: value for key, value in props.items() if key != PROVIDER_KEY},
        "containerId": attrs["Id"],
        "state": state.get("Status"),
        "exitCode": state.get("ExitCode"),
        "startedAt": state.get("StartedAt"),
    }


@dataclass
class ContainerArgs:
    name: pulumi.Input[str]
    stack: pulumi.Input[str]
    image: pulumi.Input[str]
    env: pulumi.Input[dict[str, str]]  # a secret Output when it holds a token
    folder: pulumi.Input[str]
    gpus: pulumi.Input[str | int] = "all"
    shm_size_gb: pulumi.Input[int] = 8
    user: pulumi.Input[str] = ""


class Container(pulumi.dynamic.Resource, module="local", name="Container"):
    containerId: pulumi.Output[str]
    state: pulumi.Output[str]
    env: pulumi.Output[dict[str, str]]

    def __init__(self, resource_name: str, args: ContainerArgs, opts: pulumi.ResourceOptions | None = None):
        props = {
            "name": args.name, "stack": args.stack, "image": args.image, "env": args.env, "folder": args.folder,
            "gpus": args.gpus, "shmSizeGb": args.shm_size_gb, "user": args.user,
            "containerId": None, "state": None, "exitCode": None, "startedAt": None,
        }
        fixed = pulumi.ResourceOptions(additional_secret_outputs=["env"], delete_before_replace=True)
        super().__init__(ContainerProvider(), resource_name, props, pulumi.ResourceOptions.merge(opts, fixed))
