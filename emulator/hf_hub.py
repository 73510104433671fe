"""An emulator of Hugging Face Jobs and of the part of the Hub API that lorastack's backend and trainer use, built to
the contract in shared/reference/hf-jobs-api.md (read from huggingface_hub 2.4.0, the client that drives it).

Jobs (`/api/jobs/...`): run, inspect, list (filtered by repeated `label=k=v` and `stage=` parameters), cancel,
logs as Server-Sent Events, hardware with per-minute prices. A job whose image is our trainer's runs the REAL
trainer (`python -m training`) as a local process, as the platform runs the container:

- the job's `environment` and `secrets`, plus what the platform sets inside: JOB_ID, ACCELERATOR (the flavor),
  CPU_CORES, MEMORY; HF_ENDPOINT points back at this emulator, so the trainer's Hub pushes land here;
- a directory as the job's disk, `<root>/disks/<slot>`, emptied when the job ends (Jobs have no volume that
  outlives them); the mount path (/workspace) is rewritten to it in every environment value that names it, as
  emulator/pods.py does. A new job takes the lowest slot no running job holds, so jobs one after another see the
  same path, as they all see /workspace on the platform (paths are part of the spec's fingerprint);
  `seed(directory)` stands in for what a real job downloads first (the tiny model);
- stdout and stderr become the job's log; the job ends when the process exits: COMPLETED on exit 0, ERROR
  otherwise (the server's choice on the real platform; the contract leaves it open);
- `timeoutSeconds` is enforced: past it the process is killed and the job is ERROR ("Job timeout"); cancel sends
  SIGTERM, then SIGKILL after `stop_grace_s`, and the job is CANCELED. No retry (attempts defaults to 1).

Billing: per started minute while SCHEDULING or RUNNING, at the flavor's price (infra/hfjobs_backend/catalog.py);
`bill(job_id)` keeps it after the job ends.

Hub (`/api/whoami-v2`, `/api/repos/create|delete`, `/api/models/{repo}[/revision/{rev}|/tree/{rev}|/preupload/{rev}|
/commit/{rev}|/settings]`, `/api/validate-yaml`, `/{repo}/resolve/{rev}/{path}`): model repos in memory, private
ones visible to the token only, regular (non-LFS) uploads only (what `upload_folder` sends for small files),
one revision (`main`; any commit id is served the newest). Errors carry X-Error-Code as the Hub's do.

Faults (emulator/server.py `Fault`): 429, 5xx, delays, and lost answers (`lose_answers`: the request is carried
out, then the answer is a 500, as a create whose answer never arrived).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import os
import re
import secrets as token_bytes
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from emulator.pods import (
    ENV_FAULT_HANG,
    ENV_FAULT_PROBE,
    HOST_VARIABLES,
    PodFaults,
)
from emulator.server import ApiError, JsonApi, Request, Response
from infra.config import DEFAULT_REPOSITORY
from infra.hfjobs_backend.catalog import HFJOBS_FLAVORS, Flavor
from infra.paths import REPO_ROOT

TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
CPU_FLAVORS = {"cpu-basic": 0.01, "cpu-upgrade": 0.03, "cpu-xl": 1.00, "cpu-performance": 1.90}
JOB_SPEC_FIELDS = {  # JobSpec keys the client may send (hf-jobs-api.md) and their JSON types
    "command": list, "arguments": list, "environment": dict, "flavor": str, "secrets": dict, "timeoutSeconds": int,
    "attempts": int, "labels": dict, "volumes": list, "expose": dict, "ssh": dict, "network": dict,
    "resourceGroupId": str, "dockerImage": str, "spaceId": str,
}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def hub_error(status: int, message: str, code: str | None = None, **fields: str) -> Response:
    """The Hub's error: a JSON `error` (plus `fields`) and the X-Error-Code / X-Error-Message headers the client reads."""
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return Response(status, {"error": message, **fields}, headers)


@dataclass
class JobBill:
    job_id: str
    flavor: str
    usd_per_hour: float
    started: float
    ended: float | None = None

    def billed_minutes(self, now: float) -> int:
        return math.ceil(((self.ended if self.ended is not None else now) - self.started) / 60)

    def cost_usd(self, now: float) -> float:
        return self.billed_minutes(now) * self.usd_per_hour / 60


@dataclass
class Job:
    id: str
    namespace: str
    spec: dict
    created_at: str
    stage: str = "SCHEDULING"
    message: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    logs: list[tuple[str, str]] = field(default_factory=list)  # (timestamp, line)
    ending: tuple[str, str | None] | None = None  # (stage, message) it shows once its process has exited
    process: subprocess.Popen | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict:
        spec = self.spec
        return {
            "id": self.id,
            "createdAt": self.created_at,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "dockerImage": spec.get("dockerImage"),
            "spaceId": spec.get("spaceId"),
            "command": spec.get("command"),
            "arguments": spec.get("arguments", []),
            "environment": spec.get("environment", {}),
            "secrets": sorted(spec.get("secrets") or {}),  # names only: values are never returned
            "flavor": spec.get("flavor"),
            "labels": spec.get("labels", {}),
            "status": {"stage": self.stage, "message": self.message, "exposeUrls": None, "sshUrl": None},
            "owner": {"id": f"id-{self.namespace}", "name": self.namespace, "type": "user"},
            "initiator": {"type": "user", "id": f"id-{self.namespace}", "name": self.namespace},
            "retry": spec.get("attempts", 1) - 1,
        }


@dataclass
class Repo:
    id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    sha: str = "0" * 40
    commits: int = 0


class HfHubApi(JsonApi):
    def __init__(self, root: Path, *, token: str = "hf_emulator", user: str = "lorastack-tester",
                 orgs: tuple[str, ...] = (), trainer_repositories: tuple[str, ...] = (DEFAULT_REPOSITORY,),
                 seed: Callable[[Path], None] | None = None, faults: PodFaults | None = None,
                 schedule_delay_s: float = 0.2, stop_grace_s: float = 10.0, python: str = sys.executable,
                 extra_env: dict[str, str] | None = None):
        super().__init__()
        self.root, self.token, self.user, self.orgs = Path(root), token, user, orgs
        self.trainer_repositories, self.seed, self.faults = trainer_repositories, seed, faults or PodFaults()
        self.schedule_delay_s, self.stop_grace_s, self.python = schedule_delay_s, stop_grace_s, python
        self.extra_env = dict(extra_env or {})
        self.base_url: str | None = None  # set once served: the trainer's HF_ENDPOINT
        self.jobs: dict[str, Job] = {}
        self.repos: dict[str, Repo] = {}
        self.bills: dict[str, JobBill] = {}
        self._disks: dict[str, int] = {}  # job id -> its disk slot, while it runs
        self.bodies: list[tuple[str, str, object]] = []  # (method, path, JSON body) of every request with one
        self._lost_answers: list[tuple[str, str, int]] = []  # (method, path prefix, count)
        self._ids = itertools.count(1)
        # jobs
        self.route("GET", "/api/whoami-v2", self.whoami)
        self.route("GET", "/api/jobs/hardware", self.hardware)
        self.route("POST", "/api/jobs/{namespace}", self.run_job)
        self.route("GET", "/api/jobs/{namespace}", self.list_jobs)
        self.route("GET", "/api/jobs/{namespace}/{job_id}", self.inspect_job)
        self.route("POST", "/api/jobs/{namespace}/{job_id}/cancel", self.cancel_job)
        self.route("GET", "/api/jobs/{namespace}/{job_id}/logs", self.job_logs)
        # hub
        self.route("POST", "/api/repos/create", self.create_repo)
        self.route("DELETE", "/api/repos/delete", self.delete_repo)
        self.route("POST", "/api/validate-yaml", lambda request: {"errors": [], "warnings": []})
        self.route("GET", "/api/models/{ns}/{name}", self.repo_info)
        self.route("GET", "/api/models/{ns}/{name}/revision/{rev}", self.repo_info)
        self.route("PUT", "/api/models/{ns}/{name}/settings", self.repo_settings)
        self.route("GET", "/api/models/{ns}/{name}/tree/{rev}", self.repo_tree)
        self.route("GET", "/api/models/{ns}/{name}/tree/{rev}/(?P<path>.+)", self.repo_tree)
        self.route("POST", "/api/models/{ns}/{name}/preupload/{rev}", self.preupload)
        self.route("POST", "/api/models/{ns}/{name}/commit/{rev}", self.commit)
        for method in ("GET", "HEAD"):
            self.route(method, "/{ns}/{name}/resolve/{rev}/(?P<path>.+)", self.resolve)

    # -- plumbing ---------------------------------------------------------------------------------------------
    def error_body(self, status: int, detail: str, errors: list[str]) -> object:
        return {"error": detail}

    def authorize(self, request: Request) -> None:
        if request.path.startswith("/api/jobs/hardware"):
            return
        header = request.headers.get("authorization", "")
        if request.path.startswith("/api/") and header != f"Bearer {self.token}":
            raise ApiError(401, "Invalid credentials in Authorization header")

    def lose_answers(self, method: str, path_prefix: str, count: int = 1) -> None:
        """The next `count` matching requests are carried out, then answered with a 500 (the answer is lost)."""
        with self.lock:
            self._lost_answers.append((method, path_prefix, count))

    def dispatch(self, request: Request) -> Response:
        if request.body is not None:
            with self.lock:
                self.bodies.append((request.method, request.path, request.body))
        response = super().dispatch(request)
        with self.lock:
            for index, (method, prefix, count) in enumerate(self._lost_answers):
                if method == request.method and request.path.startswith(prefix) and response.status < 400:
                    self._lost_answers[index] = (method, prefix, count - 1)
                    if count <= 1:
                        del self._lost_answers[index]
                    return Response(500, {"error": "injected fault: the answer was lost"})
        return response

    def _namespace(self, request: Request) -> str:
        namespace = request.params["namespace"]
        if namespace not in (self.user, *self.orgs):
            raise ApiError(403, f"You don't have the rights to run jobs in the namespace {namespace}")
        return namespace

    def _job(self, request: Request) -> Job:
        self._namespace(request)
        job = self.jobs.get(request.params["job_id"])
        if job is None or job.namespace != request.params["namespace"]:
            raise ApiError(404, f"Job {request.params['job_id']} not found")
        return job

    # -- jobs -------------------------------------------------------------------------------------------------
    def whoami(self, request: Request) -> dict:
        return {"type": "user", "id": f"id-{self.user}", "name": self.user,
                "orgs": [{"name": org, "type": "org"} for org in self.orgs]}

    def hardware(self, request: Request) -> list[dict]:
        items: list[tuple[str, float, Flavor | None]] = [(name, price, None) for name, price in CPU_FLAVORS.items()]
        items += [(flavor.name, flavor.usd_per_hour, flavor) for flavor in HFJOBS_FLAVORS.values()]
        return [{
            "name": name, "prettyName": name, "cpu": "8 vCPU", "ram": "32 GB", "ephemeralStorage": "100 GB",
            "accelerator": None if flavor is None else {
                "type": "gpu", "model": flavor.gpu.removeprefix("NVIDIA "), "quantity": str(flavor.gpu_count),
                "vram": f"{flavor.memory_gb} GB", "manufacturer": "Nvidia"},
            "unitCostMicroUSD": round(price / 60 * 1e6), "unitCostUSD": price / 60, "unitLabel": "minute",
        } for name, price, flavor in items]

    def run_job(self, request: Request) -> dict:
        namespace = self._namespace(request)
        spec = request.body
        if not isinstance(spec, dict):
            raise ApiError(400, "the body must be a JobSpec object")
        problems = [f"{key}: unknown field" for key in spec if key not in JOB_SPEC_FIELDS]
        problems += [f"{key}: must be {kind.__name__}" for key, kind in JOB_SPEC_FIELDS.items()
                     if key in spec and not (isinstance(spec[key], kind) and not isinstance(spec[key], bool))]
        if not spec.get("command"):
            problems.append("command: required")
        if ("dockerImage" in spec) == ("spaceId" in spec):
            problems.append("exactly one of dockerImage and spaceId")
        if spec.get("flavor", "cpu-basic") not in (*CPU_FLAVORS, *HFJOBS_FLAVORS):
            problems.append(f"flavor: unknown {spec.get('flavor')!r}")
        if problems:
            raise ApiError(400, "; ".join(problems))
        spec = {"timeoutSeconds": 30 * 60, **spec}  # the server's default when none is sent
        job = Job(f"{next(self._ids):024x}", namespace, spec, _now())
        with self.lock:
            self.jobs[job.id] = job
            flavor = spec.get("flavor", "cpu-basic")
            price = HFJOBS_FLAVORS[flavor].usd_per_hour if flavor in HFJOBS_FLAVORS else CPU_FLAVORS[flavor]
            self.bills[job.id] = JobBill(job.id, flavor, price, time.monotonic())
        threading.Thread(target=self._start, args=(job,), name=f"job-{job.id}", daemon=True).start()
        return job.to_json()

    def list_jobs(self, request: Request) -> list[dict]:
        namespace = self._namespace(request)
        labels = [value.split("=", 1) for value in request.query_all.get("label", [])]
        stages = request.query_all.get("stage", [])
        with self.lock:
            return [job.to_json() for job in self.jobs.values()
                    if job.namespace == namespace and (not stages or job.stage in stages)
                    and all(job.spec.get("labels", {}).get(key) == value for key, value in labels)]

    def inspect_job(self, request: Request) -> dict:
        with self.lock:
            return self._job(request).to_json()

    def cancel_job(self, request: Request) -> dict:
        job = self._job(request)
        self.end(job, "CANCELED", "canceled by the user")
        return {}

    def job_logs(self, request: Request) -> Response:
        job = self._job(request)
        with self.lock:
            lines = list(job.logs)

        def events():
            for stamp, line in lines:
                yield f"data: {json.dumps({'data': line, 'timestamp': stamp})}\n\n".encode()

        return Response(stream=events())

    # -- the job's process ------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        """The disk of a running job."""
        with self.lock:
            if job_id not in self._disks:
                self._disks[job_id] = min(set(range(len(self._disks) + 1)) - set(self._disks.values()))
            return self.root / "disks" / str(self._disks[job_id])

    def _free_disk(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)  # the job's disk goes with it
        with self.lock:
            del self._disks[job_id]

    def append_log(self, job: Job, line: str) -> None:
        with self.lock:
            job.logs.append((_now(), line))

    def is_trainer(self, image: str | None) -> bool:
        reference = (image or "").split("@", 1)[0]
        if ":" in reference.rsplit("/", 1)[-1]:
            reference = reference.rsplit(":", 1)[0]
        return reference in self.trainer_repositories

    def _start(self, job: Job) -> None:
        time.sleep(self.schedule_delay_s)
        with self.lock:
            if job.stage != "SCHEDULING":
                return  # canceled while scheduling
            job.stage, job.started_at = "RUNNING", _now()
        if not self.is_trainer(job.spec.get("dockerImage")):
            return  # other images only run: they end when canceled or timed out
        self._spawn(job)
        threading.Thread(target=self._watch_timeout, args=(job,), name=f"timeout-{job.id}", daemon=True).start()

    def _environment(self, job: Job, directory: Path) -> dict[str, str]:
        if not self.base_url:
            raise RuntimeError("HfHubApi.base_url is not set: the trainer could not reach the Hub")
        mount_pattern = re.compile(r'(^|")' + re.escape("/workspace") + r'(?=/|"|$)')
        env = {name: os.environ[name] for name in HOST_VARIABLES if name in os.environ}
        env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        given = {**job.spec.get("environment", {}), **(job.spec.get("secrets") or {})}
        env.update({name: mount_pattern.sub(lambda m: m.group(1) + str(directory), value)
                    for name, value in given.items()})
        flavor = job.spec.get("flavor", "cpu-basic")
        env.update({"JOB_ID": job.id, "ACCELERATOR": flavor if flavor in HFJOBS_FLAVORS else "none",
                    "CPU_CORES": "8", "MEMORY": "32Gi", "HF_ENDPOINT": self.base_url})
        if self.faults.hang_after_step is not None:
            env[ENV_FAULT_HANG] = str(self.faults.hang_after_step)
        if self.faults.probe_steps:
            env[ENV_FAULT_PROBE] = "1"
        env.update(self.extra_env)
        return env

    def _spawn(self, job: Job) -> None:
        directory = self.job_dir(job.id)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        if self.seed is not None:
            self.seed(directory)
        command = list(job.spec["command"])
        if command[:3] == ["python", "-m", "training"]:  # the image's interpreter is this one
            module = "emulator.pod_process" if self.faults.any else "training"
            command = [self.python, "-m", module, *command[3:]]
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=self._environment(job, directory),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", start_new_session=True)
        with self.lock:
            job.process = process
            ended = job.stage in TERMINAL  # canceled or timed out while it was starting
        if ended:
            _signal(process, signal.SIGKILL)
        threading.Thread(target=self._follow, args=(job, process), name=f"log-{job.id}", daemon=True).start()

    def _follow(self, job: Job, process: subprocess.Popen) -> None:
        assert process.stdout is not None  # started with stdout=PIPE
        for line in process.stdout:
            self.append_log(job, line.rstrip("\n"))
        code = process.wait()
        with self.lock:
            if job.ending is None:  # the command ended by itself
                job.ending = ("COMPLETED", None) if code == 0 else ("ERROR", f"the command exited with code {code}")
            if job.stage not in TERMINAL:  # else it ended before its process had started
                (job.stage, job.message), job.finished_at = job.ending, _now()
            bill = self.bills.get(job.id)
            if bill is not None and bill.ended is None:
                bill.ended = time.monotonic()
        self._free_disk(job.id)
        job.done.set()

    def _watch_timeout(self, job: Job) -> None:
        if not job.done.wait(job.spec["timeoutSeconds"]):
            self.end(job, "ERROR", "Job timeout")

    def end(self, job: Job, stage: str, message: str | None) -> None:
        """End a job (the first reason wins): its bill stops now; a running process gets SIGTERM, then SIGKILL
        after the grace, and the job shows the terminal stage once the process has exited (a container that is
        still stopping is not ended yet)."""
        with self.lock:
            if job.stage in TERMINAL or job.ending is not None:
                return
            bill = self.bills.get(job.id)
            if bill is not None and bill.ended is None:
                bill.ended = time.monotonic()
            process = job.process
            if process is None or process.poll() is not None:  # nothing runs in it (not our image, or not yet)
                job.stage, job.message, job.finished_at = stage, message, _now()
                if process is None:
                    job.done.set()
                return
            job.ending = (stage, message)

        def stop() -> None:
            _signal(process, signal.SIGTERM)
            try:
                process.wait(self.stop_grace_s)
            except subprocess.TimeoutExpired:
                _signal(process, signal.SIGKILL)

        threading.Thread(target=stop, name=f"stop-{job.id}", daemon=True).start()

    # -- what tests do to jobs --------------------------------------------------------------------------------
    def lose_machine(self, job_id: str) -> list[str]:
        """The machine is gone: the trainer dies without a signal, the job is ERROR, its disk is lost. Returns the
        log as it was."""
        job = self.jobs[job_id]
        with self.lock:
            running = job.process is not None and job.process.poll() is None
            if running:
                job.ending = ("ERROR", "the machine was lost")
                self.bills[job_id].ended = time.monotonic()
        if running and job.process is not None:
            _signal(job.process, signal.SIGKILL)
            job.done.wait(30)  # its log is read to the end
        with self.lock:
            return [line for _, line in job.logs]

    def wait_until_ended(self, job_id: str, timeout: float) -> bool:
        """True once the job is in a terminal stage and its process (if any) has exited."""
        job = self.jobs[job_id]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if job.stage in TERMINAL and (job.process is None or job.process.poll() is not None):
                return True
            time.sleep(0.1)
        return False

    def billing_jobs(self) -> list[str]:
        with self.lock:
            return [job_id for job_id, bill in self.bills.items() if bill.ended is None]

    def bill(self, job_id: str) -> JobBill:
        return self.bills[job_id]

    def shutdown(self) -> None:
        for job in list(self.jobs.values()):
            if job.process is not None and job.process.poll() is None:
                _signal(job.process, signal.SIGKILL)
                job.process.wait(10)

    # -- hub --------------------------------------------------------------------------------------------------
    def _visible_repo(self, request: Request) -> Repo | Response:
        repo_id = f"{request.params['ns']}/{request.params['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            return hub_error(404, f"Repository Not Found for url: {request.path}.", "RepoNotFound")
        return repo

    def create_repo(self, request: Request) -> Response | dict:
        body = request.body if isinstance(request.body, dict) else {}
        namespace = body.get("organization") or self.user
        if namespace not in (self.user, *self.orgs):
            return hub_error(403, f"You don't have the rights to create a model under the namespace {namespace}")
        if body.get("type", "model") != "model":
            return hub_error(400, "this emulator serves model repos only")
        repo_id = f"{namespace}/{body['name']}"
        with self.lock:
            if repo_id in self.repos:  # the Hub's 409 names the repo's url too: create_repo(exist_ok) returns it
                return hub_error(409, "You already created this model repo", url=f"{self.base_url}/{repo_id}")
            # the Hub's default for a user is public; our code always says which
            self.repos[repo_id] = Repo(repo_id, body.get("visibility", "public") == "private")
        return {"url": f"{self.base_url}/{repo_id}", "name": repo_id, "id": repo_id}

    def delete_repo(self, request: Request) -> Response | dict:
        body = request.body if isinstance(request.body, dict) else {}
        repo_id = f"{body.get('organization') or self.user}/{body.get('name')}"
        with self.lock:
            if self.repos.pop(repo_id, None) is None:
                return hub_error(404, f"Repository Not Found: {repo_id}", "RepoNotFound")
        return {}

    def repo_info(self, request: Request) -> Response | dict:
        repo = self._visible_repo(request)
        if isinstance(repo, Response):
            return repo
        with self.lock:
            return {"id": repo.id, "modelId": repo.id, "private": repo.private, "sha": repo.sha,
                    "siblings": [{"rfilename": path} for path in sorted(repo.files)]}

    def repo_settings(self, request: Request) -> Response | dict:
        repo = self._visible_repo(request)
        if isinstance(repo, Response):
            return repo
        with self.lock:
            body = request.body if isinstance(request.body, dict) else {}
            repo.private = body.get("visibility", "private" if repo.private else "public") == "private"
        return {}

    def repo_tree(self, request: Request) -> Response | list:
        repo = self._visible_repo(request)
        if isinstance(repo, Response):
            return repo
        prefix = request.params.get("path")
        recursive = request.query.get("recursive", "false").lower() == "true"
        with self.lock:
            files = dict(repo.files)
        entries, folders = [], set()
        for path in sorted(files):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            relative = path[len(prefix.rstrip("/")) + 1:] if prefix else path
            if not recursive and "/" in relative:
                folders.add(path[: len(path) - len(relative)] + relative.split("/", 1)[0])
                continue
            entries.append({"type": "file", "path": path, "size": len(files[path]), "oid": _git_oid(files[path])})
        entries += [{"type": "directory", "path": folder, "oid": "0" * 40} for folder in sorted(folders)]
        return entries

    def preupload(self, request: Request) -> Response | dict:
        repo = self._visible_repo(request)
        if isinstance(repo, Response):
            return repo
        files = (request.body if isinstance(request.body, dict) else {}).get("files", [])
        return {"files": [{"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                           "oid": _git_oid(repo.files[item["path"]]) if item["path"] in repo.files else None}
                          for item in files]}

    def commit(self, request: Request) -> Response | dict:
        repo = self._visible_repo(request)
        if isinstance(repo, Response):
            return repo
        try:
            operations = [json.loads(line) for line in request.raw.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return hub_error(400, "the commit body must be NDJSON")
        added, deleted = {}, []
        for operation in operations:
            key, value = operation.get("key"), operation.get("value") or {}
            if key == "file":
                if value.get("encoding") != "base64":
                    return hub_error(400, f"file {value.get('path')}: encoding must be base64")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key != "header":
                return hub_error(400, f"commit operation {key!r} is not served by this emulator (regular files only)")
        with self.lock:  # one commit is atomic: all its files appear together
            for path in deleted:
                repo.files.pop(path, None)
            repo.files.update(added)
            repo.commits += 1
            repo.sha = hashlib.sha1(f"{repo.id}:{repo.commits}".encode()).hexdigest()
        return {"commitUrl": f"{self.base_url}/{repo.id}/commit/{repo.sha}", "commitOid": repo.sha}

    def resolve(self, request: Request) -> Response:
        repo = self._visible_repo(request)
        if isinstance(repo, Response):
            return repo
        if repo.private and request.headers.get("authorization") != f"Bearer {self.token}":
            return hub_error(404, "Repository Not Found", "RepoNotFound")  # a private repo is invisible
        with self.lock:
            content, sha = repo.files.get(request.params["path"]), repo.sha
        if content is None:
            return hub_error(404, f"Entry Not Found: {request.params['path']}", "EntryNotFound")
        return Response(200, content, {"X-Repo-Commit": sha, "ETag": f'"{_git_oid(content)}"'},
                        content_type="application/octet-stream")


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def new_token() -> str:
    return "hf_" + token_bytes.token_hex(16)
