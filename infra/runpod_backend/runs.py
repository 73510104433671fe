"""A stack's run on RunPod, read from outside: its pods, its progress, its log, and its LoRA's files.

The library under `make status|logs|fetch` (infra/ops.py) and `wait: true` (follow.py). The stack's pod is found by
name (`contract.naming.pod_name(stack)`) in the pod list. Progress comes from `runs/<run-id>/status.json` when the
network volume is mounted here (LORASTACK_WORKSPACE points at it, as on a pod or in `make demo`), otherwise from
the newest progress line in the pod's log stream.

The run comes from the volume when it is mounted here, else through RunPod's S3-compatible API for network
volumes (s3.py, with an S3 API key); when neither is possible the steps that reach the files are given instead.
What comes into outputs/<stack>/: the LoRA's files and model card (at the top, as a Hub download lays them out),
samples/, history.jsonl and status.json (checkpoints stay on the volume); then report/ renders the grids, the loss
curve and report.html there. Every credential is named, with where to set it, when it is missing; none is printed.

The run id depends on the spec the pod received: for a local dataset folder that names its upload on the volume,
so `status` and `fetch` hash the folder too (uploads.spec_for_pod; cheap when it has not changed).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import requests

from cloudapi.runpod_rest import LIVE_POD_STATUSES, RunpodClient, RunpodError
from contract.dataset import DatasetError
from contract.history import HISTORY_FILE, SAMPLES_DIR
from contract.naming import pod_name, run_id
from contract.spec import ENV_WORKSPACE, WORKSPACE_MOUNT, TrainSpec
from contract.workspace import RunPaths, read_json, workspace_root
from infra.backends import OpsError, Report
from infra.credentials import SECRETS
from infra.progress import Progress, parse_progress_line, progress_from_status_file
from infra.runpod_backend import s3 as runpod_s3
from infra.runpod_backend.uploads import spec_for_pod
from infra.table import render_table

STATUS_LOG_TAIL = 500  # lines of backfill searched for the newest progress line
STATUS_READ_TIMEOUT_S = 3.0  # a live stream goes quiet after its backfill: stop reading there
STATUS_DEADLINE_S = 10.0  # and never read a chatty stream for longer than this
FOLLOW_READ_TIMEOUT_S = 120.0  # `logs` reconnects after this long without a line
S3_ACCESS_KEY_ENV = runpod_s3.ACCESS_KEY_ENV  # RunPod S3 API key: access key (user_...)
S3_SECRET_KEY_ENV = runpod_s3.SECRET_KEY_ENV  # and its secret (rps_...)
RUN_FILES = (HISTORY_FILE, "status.json")  # fetched beside the LoRA
API_HINT = "(check RUNPOD_API_KEY, and RUNPOD_API_BASE_URL if set)"


# --- finding things -------------------------------------------------------------------------------------------


def api_key(environ: Mapping[str, str]) -> str | None:
    """The RunPod API key for commands run outside Pulumi (status, logs, fetch, reap, cost): the one place it is read."""
    return environ.get(SECRETS["runpodApiKey"]) or None


def runpod_client(environ: Mapping[str, str], timeout: float = 30.0) -> RunpodClient:
    key = api_key(environ)
    if not key:
        raise OpsError(
            "RUNPOD_API_KEY is not set: export RUNPOD_API_KEY=<key> (RunPod console > Settings > API Keys) for "
            "make status/logs/fetch; `pulumi config set --secret runpodApiKey` covers only pulumi commands "
            "(make preview/train/destroy)"
        )
    return RunpodClient(key, timeout=timeout)


def find_pods(client: RunpodClient, stack: str) -> list[dict]:
    """The stack's pods, newest first (more than one means an old one was left behind: the reaper's job)."""
    name = pod_name(stack)
    pods = [pod for pod in client.list_pods() if pod.get("name") == name]
    return sorted(pods, key=lambda pod: pod.get("createdAt") or "", reverse=True)


def stack_run_id(stack: str, spec: TrainSpec) -> str:
    """The run id the stack's pod got (see the module docstring)."""
    try:
        return run_id(stack, spec_for_pod(spec))
    except DatasetError as error:
        raise OpsError(str(error)) from None


def local_status(stack: str, spec, environ: Mapping[str, str]) -> dict | None:
    """status.json when the volume is mounted here (LORASTACK_WORKSPACE set)."""
    if not environ.get(ENV_WORKSPACE):
        return None
    return read_json(RunPaths(workspace_root(dict(environ)), stack_run_id(stack, spec)).status)


def progress_from_logs(client: RunpodClient, pod_id: str, clock=time.monotonic) -> Progress | None:
    """The newest progress line in the pod's log backfill. A live stream never ends by itself, so reading
    stops when it goes quiet (the backfill is over) or at a deadline."""
    latest = None
    deadline = clock() + STATUS_DEADLINE_S
    try:
        for event in client.pod_logs(pod_id, tail=STATUS_LOG_TAIL):
            parsed = parse_progress_line(str(event.get("line", "")))
            if parsed is not None:
                latest = parsed
            if clock() > deadline:
                break
    except (requests.RequestException, RunpodError):
        pass  # quiet after the backfill (read timeout) or the stream broke: keep what was read
    return latest


def cost_so_far(pod: dict) -> float | None:
    """$/hour x time since start, for a live pod whose trainer has not reported a cost yet."""
    started, usd_per_hour = pod.get("startedAt"), pod.get("cost")
    if not started or not usd_per_hour or pod.get("status") not in LIVE_POD_STATUSES:
        return None
    begun = datetime.fromisoformat(started.replace("Z", "+00:00"))
    return (datetime.now(UTC) - begun).total_seconds() / 3600 * usd_per_hour


def api_errors_named(hook: Callable[..., Report]) -> Callable[..., Report]:
    """An API error becomes an OpsError that says which settings to check (the key itself is never in it)."""

    def wrapped(*args, **kwargs) -> Report:
        try:
            return hook(*args, **kwargs)
        except RunpodError as error:
            raise OpsError(f"{error} {API_HINT}") from None

    return wrapped


# --- status ---------------------------------------------------------------------------------------------------

STATUS_COLUMNS = ("pod", "state", "step", "loss", "s/step", "ETA", "cost so far", "progress from")


def status_rows(pods: list[dict], progress: dict[str, Progress | None]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for pod in pods:
        found = progress.get(pod["id"])
        state = pod.get("status", "?")
        if found is not None and found.state and found.state != "running":
            state = f"{state} ({found.state})"  # e.g. EXITED (succeeded): the trainer stopped its pod
        if found is not None and found.cost_usd is not None:
            cost = f"${found.cost_usd:.2f}"
        else:
            estimated = cost_so_far(pod)
            cost = f"~${estimated:.2f}" if estimated is not None else "-"
        rows.append((
            pod["id"],
            state,
            f"{found.step}/{found.total}" if found and found.step is not None else "-",
            f"{found.loss:.4f}" if found and found.loss is not None else "-",
            f"{found.seconds_per_step:.2f}" if found and found.seconds_per_step is not None else "-",
            found.eta if found and found.eta else "-",
            cost,
            found.source if found else "no progress yet",
        ))
    return rows


@api_errors_named
def status(stack: str, config, environ: Mapping[str, str]) -> Report:
    client = runpod_client(environ, timeout=STATUS_READ_TIMEOUT_S)
    print(f"looking up {pod_name(stack)} ...", file=sys.stderr, flush=True)
    pods = find_pods(client, stack)
    if not pods:
        return Report([f"{stack}: no pod named {pod_name(stack)}: not started yet (make train STACK={stack}) or "
                       f"already terminated (make fetch STACK={stack} for its LoRA)"])
    status_file = local_status(stack, config.train, environ)
    progress: dict[str, Progress | None] = {}
    for pod in pods:
        if status_file is not None and pod is pods[0]:
            progress[pod["id"]] = progress_from_status_file(status_file)
        else:
            print(f"reading the log of pod {pod['id']} ...", file=sys.stderr, flush=True)
            progress[pod["id"]] = progress_from_logs(client, pod["id"])
    lines = [render_table(STATUS_COLUMNS, status_rows(pods, progress))]
    if len(pods) > 1:
        lines.append(f"WARNING: {len(pods)} pods are named {pod_name(stack)}; the older ones still bill while running "
                     "(make reap terminates strays)")
    return Report(lines)


# --- logs -----------------------------------------------------------------------------------------------------


def follow_logs(client: RunpodClient, pod_id: str, emit: Callable[[str], None], tail: int = 100) -> None:
    """Emit the pod's log as it comes; reconnect after a quiet spell; return when the pod has stopped."""
    while True:
        try:
            for event in client.pod_logs(pod_id, tail=tail):
                emit(event.get("line", ""))
        except (requests.RequestException, RunpodError):
            pass  # quiet for FOLLOW_READ_TIMEOUT_S or dropped: look at the pod, then reconnect
        state = client.get_pod(pod_id).get("status")
        if state not in LIVE_POD_STATUSES:
            emit(f"-- pod {pod_id} is {state}: the log has ended")
            return
        tail = 0  # reconnect live, without replaying the backfill


@api_errors_named
def logs(stack: str, config, environ: Mapping[str, str], emit: Callable[[str], None]) -> Report:
    client = runpod_client(environ, timeout=FOLLOW_READ_TIMEOUT_S)
    pods = find_pods(client, stack)
    if not pods:
        raise OpsError(f"no pod named {pod_name(stack)}: start one with make train STACK={stack}")
    emit(f"-- following pod {pods[0]['id']} ({pods[0].get('status')}); Ctrl-C stops")
    follow_logs(client, pods[0]["id"], emit)
    return Report([])


# --- fetch ----------------------------------------------------------------------------------------------------


def outputs_name(relative: str) -> str | None:
    """Where a file of runs/<id>/ goes in outputs/<stack>/ (None: it stays on the volume)."""
    if relative.startswith("lora/"):
        return relative.removeprefix("lora/")
    if relative.startswith(f"{SAMPLES_DIR}/") or relative in RUN_FILES:
        return relative
    return None


def fetch_from_s3(volume_id: str, data_center: str, prefix: str, destination: Path, environ: Mapping[str, str],
                  make_client=None, place: Callable[[str], str | None] = lambda relative: relative) -> list[Path]:
    """Every file under `prefix` on the volume (the S3 bucket is the volume id) into `destination`, at
    `place(path relative to prefix)`, skipping those it places nowhere (None)."""
    keys = runpod_s3.keys_from(environ)
    if keys is None:
        raise OpsError(f"{S3_ACCESS_KEY_ENV} and {S3_SECRET_KEY_ENV} are not set")
    s3 = runpod_s3.client(data_center, keys, environ, make_client)
    written = []
    for key, size in runpod_s3.list_files(s3, volume_id, prefix).items():
        relative = place(key[len(prefix):].lstrip("/"))
        if not relative:
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"  {relative} ({size / 1e6:.1f} MB)", file=sys.stderr, flush=True)
        body = s3.get_object(Bucket=volume_id, Key=key)["Body"]
        partial = target.with_name(target.name + ".part")
        with partial.open("wb") as handle:
            for chunk in body.iter_chunks(1 << 20):
                handle.write(chunk)
        partial.replace(target)  # a file in outputs/ is whole or absent
        written.append(target)
    return written


def fetch_run_from_s3(volume_id: str, data_center: str, run: str, destination: Path,
                      environ: Mapping[str, str]) -> list[Path]:
    return fetch_from_s3(volume_id, data_center, run_dir(run) + "/", destination, environ, place=outputs_name)


def copy_run(paths: RunPaths, destination: Path) -> list[Path]:
    """The run's files from a volume mounted here into `destination` (outputs_name decides what and where)."""
    written = []
    for source in sorted(paths.run.rglob("*")):
        relative = source.relative_to(paths.run)
        placed = outputs_name(relative.as_posix())
        if placed is None or not source.is_file() or any(part.startswith(".") for part in relative.parts):
            continue  # checkpoints stay; a hidden name is a file being written (atomic_file)
        target = destination / placed
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        written.append(target)
    return written


def render_run_report(destination: Path, stack: str, run: str, gpu: str | None) -> Path:
    """report.html (grids, loss curve, facts) over the fetched run; cost and state come from its status.json."""
    from report import RunFacts, render_report  # Pillow, matplotlib, Jinja2: only once there is a run to show

    return render_report(destination, RunFacts(stack=stack, backend="runpod", gpu=gpu, run_id=run))


def has_s3_keys(environ: Mapping[str, str]) -> bool:
    return runpod_s3.keys_from(environ) is not None


def find_volume(client: RunpodClient, stack: str, data_center: str | None) -> dict | None:
    """The stack's network volume: the one its pod mounts, else the one named like the pod in its data center."""
    for pod in find_pods(client, stack):
        network = (pod.get("mounts") or {}).get("network") or []
        if network:
            return client.get_volume(network[0]["volumeId"])
    return next((volume for volume in client.list_volumes()
                 if volume.get("name") == pod_name(stack) and volume.get("dataCenter") == data_center), None)


def run_dir(run: str) -> str:
    """The run's folder relative to the volume's root (an S3 prefix), as contract.workspace lays it out."""
    paths = RunPaths(Path("/"), run)
    return paths.run.relative_to(paths.root).as_posix()


def lora_dir(run: str) -> str:
    """The LoRA's folder relative to the volume's root (the S3 prefix), as contract.workspace lays it out."""
    paths = RunPaths(Path("/"), run)
    return paths.lora.relative_to(paths.root).as_posix()


def volume_steps(stack: str, lora: str, volume: dict | None, data_center: str | None) -> str:
    volume_id = volume["id"] if volume else "<volume id: RunPod console > Storage>"
    dc = data_center or "<data center>"
    return "\n".join([
        f"The LoRA of {stack} is on its RunPod network volume, in {WORKSPACE_MOUNT}/{lora}/. Two ways to reach it:",
        "  1. RunPod's S3-compatible API (no pod needed; some data centers only, see docs.runpod.io/storage/s3-api):",
        "     create an S3 API key (RunPod console > Settings > S3 API Keys), then",
        f"       export {S3_ACCESS_KEY_ENV}=user_...  {S3_SECRET_KEY_ENV}=rps_...",
        f"       make fetch STACK={stack}",
        "     or with the AWS CLI:",
        f"       aws s3 cp --recursive --region {dc} --endpoint-url https://s3api-{dc.lower()}.runpod.io "
        f"s3://{volume_id}/{lora}/ outputs/{stack}/",
        "  2. A running pod that mounts the volume (billed while it runs): in the RunPod console deploy a small pod in",
        f"     {dc} with network volume {volume_id}, then copy {WORKSPACE_MOUNT}/{lora}/ out with `runpodctl send` or",
        "     scp over the pod's SSH port, and terminate the pod.",
    ])


@api_errors_named
def fetch(stack: str, config, destination: Path, environ: Mapping[str, str]) -> Report:
    paths = RunPaths(workspace_root(dict(environ)), stack_run_id(stack, config.train))
    lora = lora_dir(paths.run_id)
    gpu = config.backend.hardware(config)
    if environ.get(ENV_WORKSPACE):
        if not paths.lora.is_dir():
            raise OpsError(f"no LoRA yet in {paths.lora} ({ENV_WORKSPACE} is set): the run has not exported it")
        lines = []
        if not paths.done.exists():
            lines.append(f"note: {paths.done} is missing: the run has not finished; copying what is there")
        copy_run(paths, destination)
        report = render_run_report(destination, stack, paths.run_id, gpu)
        return Report([*lines, f"{stack}: the run's LoRA, samples and history copied from {paths.run} into "
                               f"{destination}", f"report: {report}"])

    client = runpod_client(environ)
    volume = find_volume(client, stack, config.runpod.data_center)
    data_center = volume["dataCenter"] if volume else config.runpod.data_center
    if volume is None or not has_s3_keys(environ):
        missing = "no network volume of this stack was found" if volume is None else (
            f"{S3_ACCESS_KEY_ENV} and {S3_SECRET_KEY_ENV} are not set")
        return Report([f"{stack}: cannot download the LoRA directly: {missing}.\n",
                       volume_steps(stack, lora, volume, data_center)], code=2)
    print(f"downloading s3://{volume['id']}/{run_dir(paths.run_id)}/ from RunPod's S3 API ({data_center}) into "
          f"{destination} ...", file=sys.stderr, flush=True)
    try:
        written = fetch_run_from_s3(volume["id"], data_center, paths.run_id, destination, environ)
    except Exception as error:  # botocore's errors share no base class with requests'; each is reported alike
        raise OpsError(f"the S3 download failed ({type(error).__name__}: {error})\n\n"
                       + volume_steps(stack, lora, volume, data_center)) from None
    if not any(path.suffix == ".safetensors" for path in written):
        raise OpsError(f"nothing under {lora}/ on volume {volume['id']}: the run has not exported its LoRA yet "
                       f"(make status STACK={stack})")
    report = render_run_report(destination, stack, paths.run_id, gpu)
    return Report([f"{stack}: {len(written)} files of the run (LoRA, samples, history) in {destination}",
                   f"report: {report}"])
