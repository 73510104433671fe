"""A Vast.ai REST emulator built to the vendor's contract (shared/reference/vastai-openapi.yaml, vastai-api.md).

What it serves, on both the spec's paths and vast-cli's (with a trailing slash):
- POST /api/v0/bundles/: offer search with the `{op: value}` filters (eq neq gt gte lt lte in notin), `order`,
  `limit`; a rented offer leaves the market until its instance is destroyed;
- PUT /api/v0/asks/{offer}/: create; `{"success", "new_contract", "instance_api_key"}`; 404 `no_such_ask`;
  `env` as the spec's docker-flag string or vast-cli's dict;
- GET /api/v0/instances/{id}/ (a single object under `instances`, null when gone); GET /api/v1/instances/
  (≤25 a page, `next_token`, `select_filters` on label); PUT (state, label) and DELETE /api/v0/instances/{id}/;
- PUT /api/v0/instances/request_logs/{id}/ -> a `result_url` served by this emulator (as S3 would).
Auth is `Authorization: Bearer <key>`; an instance's own key (CONTAINER_API_KEY) may only start, stop or destroy
that instance. Errors are `{"success": false, "error", "msg"}`. Every request is recorded with its body, so a
test can validate what our client sent against the spec. Faults: emulator/server.py's (429, 5xx, delays, and a
delay with status 0, which answers too late: a lost answer).

The runtime (`VastRuntime`) runs an instance whose image is our trainer as `python -m training` on this machine
(emulator/pods.py does the same for RunPod pods), with what Vast sets inside a container: CONTAINER_ID,
CONTAINER_API_KEY and VAST_URL pointing back here. The instance's disk is a directory that dies with the
instance (`/workspace` in env values is rewritten to it; see `disk`). A container that exits leaves the instance `exited`
(still billing disk); `lose_host` kills the process, wipes the disk and marks the instance `offline`.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulator.pods import HOST_VARIABLES
from emulator.server import ApiError, JsonApi, Request, Response
from infra.config import DEFAULT_REPOSITORY
from infra.paths import REPO_ROOT

PAGE_SIZE = 25
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b, "neq": lambda a, b: a != b, "gt": lambda a, b: a is not None and a > b,
    "gte": lambda a, b: a is not None and a >= b, "lt": lambda a, b: a is not None and a < b,
    "lte": lambda a, b: a is not None and a <= b, "in": lambda a, b: a in b, "notin": lambda a, b: a not in b,
}
_QUERY_KEYWORDS = ("order", "type", "limit", "allocated_storage")


def offer(offer_id: int, gpu_name: str, dph_total: float, *, num_gpus: int = 1, reliability: float = 0.99,
          disk_space: float = 200.0, verified: bool = True, machine_id: int | None = None) -> dict:
    """An offer as the search returns it (the fields a provider reads; see vastai-api.md "Offer fields")."""
    return {
        "id": offer_id, "ask_contract_id": offer_id, "machine_id": machine_id or 1000 + offer_id,
        "host_id": 500 + offer_id, "gpu_name": gpu_name, "num_gpus": num_gpus, "gpu_ram": 24576,
        "reliability": reliability, "reliability2": reliability, "disk_space": disk_space,
        "verification": "verified" if verified else "unverified", "verified": verified, "rentable": True,
        "rented": False, "dph_base": round(dph_total * 0.9, 4), "dph_total": dph_total, "storage_cost": 0.1,
        "inet_up_cost": 0.0, "inet_down_cost": 0.0, "geolocation": "US", "cuda_max_good": 12.8,
    }


def parse_env(value: Any) -> dict[str, str]:
    """Create's `env`: the spec's docker-flag string (`-e K=V -p 8000:8000`) or vast-cli's dict."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items() if not str(k).startswith("-")}
    if isinstance(value, str):
        words, env = shlex.split(value), {}
        for flag, item in zip(words, words[1:], strict=False):  # each word with the one after it
            if flag == "-e" and "=" in item:
                name, _, val = item.partition("=")
                env[name] = val
        return env
    if value is None:
        return {}
    raise ApiError(400, "env must be a string or an object", ["invalid_args"])


@dataclass
class InstanceRecord:
    id: int
    offer: dict
    image: str
    label: str
    env: dict[str, str]
    disk: float
    api_key: str
    start_date: float = field(default_factory=time.time)
    actual_status: str | None = None  # null while provisioning
    intended_status: str = "running"
    logs: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "id": self.id, "label": self.label, "image_uuid": self.image, "extra_env": [[k, v] for k, v in self.env.items()],
            "actual_status": self.actual_status, "intended_status": self.intended_status,
            "cur_state": "running" if self.intended_status == "running" else "stopped", "next_state": self.intended_status,
            "machine_id": self.offer["machine_id"], "gpu_name": self.offer["gpu_name"], "num_gpus": self.offer["num_gpus"],
            "dph_base": self.offer["dph_base"], "dph_total": self.offer["dph_total"], "disk_space": self.disk,
            "reliability2": self.offer["reliability"], "start_date": self.start_date, "end_date": None,
            "status_msg": "", "ssh_host": None, "ssh_port": None, "public_ipaddr": "127.0.0.1",
        }


class InstanceRuntime:
    """What happens to containers; this base only marks them running (no trainer): for API-only tests."""

    api: VastApi

    def bind(self, api: VastApi) -> None:
        self.api = api

    def on_start(self, instance: InstanceRecord) -> None:
        instance.actual_status = "running"

    def on_stop(self, instance: InstanceRecord) -> None:
        instance.actual_status = "stopped"

    def on_destroy(self, instance: InstanceRecord) -> None:
        pass


class VastApi(JsonApi):
    def __init__(self, api_key: str, offers: list[dict], runtime: InstanceRuntime | None = None):
        super().__init__()
        self.api_key = api_key
        self.offers = {item["id"]: item for item in offers}
        self.instances: dict[int, InstanceRecord] = {}
        self.destroyed: dict[int, InstanceRecord] = {}  # kept for tests: a destroyed instance's log
        self.bodies: list[Request] = []  # every request, with its body and query: for the spec validation test
        self.runtime = runtime or InstanceRuntime()
        self.runtime.bind(self)
        self._ids = itertools.count(20_000_001)
        self._log_urls: dict[str, int] = {}
        for prefix, template, handler in (
            ("POST", "/api/v0/bundles", self.search_offers),
            ("PUT", "/api/v0/asks/{id}", self.create_instance),
            ("GET", "/api/v0/instances/{id}", self.show_instance),
            ("PUT", "/api/v0/instances/{id}", self.manage_instance),
            ("DELETE", "/api/v0/instances/{id}", self.destroy_instance),
            ("GET", "/api/v1/instances", self.list_instances),
            ("PUT", "/api/v0/instances/request_logs/{id}", self.request_logs),
            ("GET", "/emulator-logs/{token}", self.log_file),
        ):
            self.route(prefix, template, handler)
            self.route(prefix, template + "/", handler)

    def dispatch(self, request: Request) -> Response:
        with self.lock:
            self.bodies.append(request)
        return super().dispatch(request)

    def error_body(self, status: int, detail: str, errors: list[str]) -> object:
        return {"success": False, "error": errors[0] if errors else {429: "rate_limited"}.get(status, "error"), "msg": detail}

    def authorize(self, request: Request) -> None:
        if request.path.startswith("/emulator-logs/"):
            return  # a presigned URL: no key
        token = (request.headers.get("authorization") or "").removeprefix("Bearer ").strip() or request.query.get("api_key")
        if token == self.api_key:
            return
        with self.lock:
            owner = next((i for i in self.instances.values() if i.api_key == token), None)
        own_path = owner is not None and request.path.rstrip("/") == f"/api/v0/instances/{owner.id}"
        if own_path and request.method in ("PUT", "DELETE"):
            body = request.body if isinstance(request.body, dict) else {}
            if request.method == "DELETE" or set(body) <= {"state"}:
                return  # the instance key: start, stop or destroy this one instance only
        raise ApiError(401 if owner is None else 403, "invalid or missing API key", ["unauthorized"])

    # -- helpers ----------------------------------------------------------------------------------------------
    def instance(self, instance_id: Any) -> InstanceRecord:
        try:
            record = self.instances.get(int(instance_id))
        except (TypeError, ValueError):
            record = None
        if record is None:
            raise ApiError(404, f"no instance {instance_id}", ["not_found"])
        return record

    def append_log(self, instance_id: int, line: str) -> None:
        with self.lock:
            record = self.instances.get(instance_id) or self.destroyed.get(instance_id)
            if record is not None:
                record.logs.append(line)

    def destroy(self, instance_id: int) -> None:
        """Destroy from the emulator's side too (what DELETE does): the offer returns to the market."""
        with self.lock:
            record = self.instances.pop(instance_id, None)
            if record is None:
                return
            self.destroyed[instance_id] = record
            self.offers[record.offer["id"]] = record.offer
        self.runtime.on_destroy(record)

    # -- handlers ---------------------------------------------------------------------------------------------
    def search_offers(self, request: Request) -> dict:
        query = request.body if isinstance(request.body, dict) else {}
        with self.lock:
            found = [dict(item) for item in self.offers.values() if _matches(item, query)]
        for column, direction in reversed(query.get("order") or [["dph_total", "asc"]]):  # stable: first key wins
            found.sort(key=lambda item: item.get(column) or 0, reverse=direction == "desc")
        return {"offers": found[: int(query.get("limit") or 64)]}

    def create_instance(self, request: Request) -> dict:
        body = request.body if isinstance(request.body, dict) else {}
        if not isinstance(body.get("image"), str) or not body["image"]:
            raise ApiError(400, "image is required", ["invalid_args"])
        with self.lock:
            try:
                chosen = self.offers.pop(int(request.params["id"]))
            except (KeyError, ValueError):
                raise ApiError(404, f"offer {request.params['id']} is not available", ["no_such_ask"]) from None
            record = InstanceRecord(next(self._ids), chosen, body["image"], str(body.get("label") or ""),
                                    parse_env(body.get("env")), float(body.get("disk") or 10), secrets.token_hex(16))
            self.instances[record.id] = record
        if body.get("target_state", "running") == "running":
            self.runtime.on_start(record)
        else:
            record.intended_status, record.actual_status = "stopped", "stopped"
        return {"success": True, "new_contract": record.id, "instance_api_key": record.api_key}

    def show_instance(self, request: Request) -> dict:
        with self.lock:
            record = self.instances.get(int(request.params["id"])) if request.params["id"].isdigit() else None
            return {"instances": record.to_json() if record else None}

    def list_instances(self, request: Request) -> dict:
        import json

        limit = min(int(request.query.get("limit") or PAGE_SIZE), PAGE_SIZE)
        filters = json.loads(request.query.get("select_filters") or "{}")
        after = int(request.query.get("after_token") or 0)
        with self.lock:
            rows = [record.to_json() for record in sorted(self.instances.values(), key=lambda r: r.id)]
        rows = [row for row in rows if _matches(row, filters) and row["id"] > after]
        page = rows[:limit]
        more = len(rows) > limit
        return {"success": True, "instances_found": len(page), "total_instances": len(self.instances),
                "label_counts": {}, "next_token": str(page[-1]["id"]) if more else None, "instances": page}

    def manage_instance(self, request: Request) -> dict:
        body = request.body if isinstance(request.body, dict) else {}
        record = self.instance(request.params["id"])
        if "label" in body:
            record.label = str(body["label"])
        state = body.get("state")
        if state == "stopped" and record.intended_status != "stopped":
            record.intended_status = "stopped"
            self.runtime.on_stop(record)
        elif state == "running" and record.intended_status != "running":
            record.intended_status = "running"
            self.runtime.on_start(record)
        elif state not in (None, "running", "stopped"):
            raise ApiError(400, f"state must be running or stopped, not {state!r}", ["invalid_args"])
        return {"success": True}

    def destroy_instance(self, request: Request) -> dict:
        record = self.instance(request.params["id"])
        self.destroy(record.id)
        return {"success": True}

    def request_logs(self, request: Request) -> dict:
        record = self.instance(request.params["id"])
        token = secrets.token_hex(8)
        with self.lock:
            self._log_urls[token] = record.id
        base = f"http://{request.headers.get('host')}"
        return {"success": True, "result_url": f"{base}/emulator-logs/{token}"}

    def log_file(self, request: Request) -> Response:
        with self.lock:
            instance_id = self._log_urls.get(request.params["token"])
            record = self.instances.get(instance_id) if instance_id is not None else None
            text = "\n".join(record.logs) + "\n" if record else ""
        if instance_id is None:
            raise ApiError(404, "no such object", ["NoSuchKey"])
        return Response(200, stream=iter([text.encode()]))


def _matches(row: dict, filters: dict) -> bool:
    for column, condition in filters.items():
        if column in _QUERY_KEYWORDS or not isinstance(condition, dict):
            continue
        value = row.get(column)
        if column == "verified":
            value = row.get("verification") == "verified"
        for op, expected in condition.items():
            if op not in _OPS or not _OPS[op](value, expected):
                return False
    return True


# -- instances that run the trainer ---------------------------------------------------------------------------


class VastRuntime(InstanceRuntime):
    """Runs an instance of our trainer image as `python -m training`; its disk is `<root>/instances/<id>`."""

    def __init__(self, root: Path, *, base_url: str | None = None, python: str = sys.executable,
                 trainer_repositories: tuple[str, ...] = (DEFAULT_REPOSITORY,), extra_env: dict[str, str] | None = None,
                 seed_disk: Callable[[Path], None] | None = None, stop_grace_s: float = 10.0):
        self.root, self.base_url, self.python = Path(root), base_url, python
        self.trainer_repositories = trainer_repositories
        self.extra_env = dict(extra_env or {})
        self.seed_disk = seed_disk
        self.stop_grace_s = stop_grace_s
        self.processes: dict[int, subprocess.Popen] = {}
        self.exited: dict[int, threading.Event] = {}

    def disk(self, instance_id: int) -> Path:
        """The instance's disk. Named by its label, not its id: the trainer's spec carries the rewritten /workspace
        paths, and a replacement (which comes only after its predecessor is gone) must see the same ones, as every
        real instance sees /workspace. The directory itself dies with each instance."""
        with self.api.lock:
            record = self.api.instances.get(instance_id) or self.api.destroyed.get(instance_id)
        return self.root / "disks" / re.sub(r"[^A-Za-z0-9_.-]", "_", (record.label if record else None) or str(instance_id))

    def on_start(self, instance: InstanceRecord) -> None:
        if instance.image.rsplit("@", 1)[0].rsplit(":", 1)[0] not in self.trainer_repositories:
            instance.actual_status = "running"
            return
        instance.actual_status = "loading"
        threading.Thread(target=self._run, args=(instance,), name=f"instance-{instance.id}", daemon=True).start()

    def _environment(self, instance: InstanceRecord) -> dict[str, str]:
        if not self.base_url:
            raise RuntimeError("VastRuntime.base_url is not set: the trainer could not reach the API to destroy itself")
        disk = self.disk(instance.id)
        fresh = not disk.exists()
        disk.mkdir(parents=True, exist_ok=True)
        if fresh and self.seed_disk is not None:
            self.seed_disk(disk)
        mount = re.compile(r'(^|")/workspace(?=/|"|$)')  # the one liberty: no mount without privileges
        env = {name: os.environ[name] for name in HOST_VARIABLES if name in os.environ}
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        env.update({name: mount.sub(lambda m: m.group(1) + str(disk), value) for name, value in instance.env.items()})
        env.update({"CONTAINER_ID": str(instance.id), "CONTAINER_API_KEY": instance.api_key, "VAST_URL": self.base_url,
                    "VAST_CONTAINERLABEL": f"C.{instance.id}", "GPU_COUNT": str(instance.offer["num_gpus"])})
        env.update(self.extra_env)
        return env

    def _run(self, instance: InstanceRecord) -> None:
        process = subprocess.Popen([self.python, "-m", "training"], cwd=REPO_ROOT, env=self._environment(instance),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", start_new_session=True)
        done = self.exited[instance.id] = threading.Event()
        self.processes[instance.id] = process
        with self.api.lock:
            if instance.id in self.api.instances and instance.actual_status == "loading":
                instance.actual_status = "running"
        assert process.stdout is not None  # started with stdout=PIPE
        for line in process.stdout:
            self.api.append_log(instance.id, line.rstrip("\n"))
        code = process.wait()
        done.set()
        with self.api.lock:
            if instance.actual_status in ("running", "loading"):
                instance.actual_status = "exited"  # Vast does not restart it: it bills its disk until destroyed
                instance.logs.append(f"container exited with code {code}")

    def _kill(self, instance_id: int, graceful: bool) -> None:
        process = self.processes.get(instance_id)
        if process is None or process.poll() is not None:
            return

        def signal_group(signum: int) -> None:
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                pass

        if not graceful:
            signal_group(signal.SIGKILL)
            return

        def stop() -> None:
            # the trainer may be the caller (its own destroy): let its request get its answer first
            if self.exited[instance_id].wait(0.5):
                return
            signal_group(signal.SIGTERM)
            if not self.exited[instance_id].wait(self.stop_grace_s):
                signal_group(signal.SIGKILL)

        threading.Thread(target=stop, daemon=True).start()

    def on_stop(self, instance: InstanceRecord) -> None:
        self._kill(instance.id, graceful=True)
        instance.actual_status = "stopped"

    def on_destroy(self, instance: InstanceRecord) -> None:
        self._kill(instance.id, graceful=True)
        disk = self.disk(instance.id)
        if not disk.exists():
            return
        # the disk goes with the instance: out of the way now (a replacement may start at once), removed once
        # the trainer has exited
        gone = disk.with_name(f".destroyed-{instance.id}")
        disk.rename(gone)
        threading.Thread(target=self._wipe_when_exited, args=(instance.id, gone), daemon=True).start()

    def _wipe_when_exited(self, instance_id: int, directory: Path) -> None:
        event = self.exited.get(instance_id)
        if event is not None:
            event.wait(self.stop_grace_s + 5)
        shutil.rmtree(directory, ignore_errors=True)

    def lose_host(self, instance_id: int) -> list[str]:
        """The machine is gone: the trainer is killed mid-step, its disk lost, the instance `offline`."""
        self._kill(instance_id, graceful=False)
        event = self.exited.get(instance_id)
        if event is not None:
            event.wait(10)
        with self.api.lock:
            record = self.api.instances[instance_id]
            record.actual_status = "offline"
            lines = list(record.logs)
        shutil.rmtree(self.disk(instance_id), ignore_errors=True)
        return lines

    def wait_until_gone(self, instance_id: int, timeout: float) -> bool:
        """True once the instance is destroyed and its trainer has exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.api.lock:
                gone = instance_id not in self.api.instances
            event = self.exited.get(instance_id)
            if gone and (event is None or event.is_set()):
                return True
            time.sleep(0.1)
        return False

    def shutdown(self) -> None:
        for instance_id in list(self.processes):
            self._kill(instance_id, graceful=False)
        for event in list(self.exited.values()):
            event.wait(10)
