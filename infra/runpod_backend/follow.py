"""`wait: true`: `pulumi up` follows the run to its end, then downloads it to outputs/<stack>/ and renders its report.

The follower is a step of the RunpodTraining component, not a resource: it changes nothing in the cloud and
leaves nothing in the state to diff, so a second `up` with no change creates, updates and replaces nothing (it
only looks at the finished run again and refreshes outputs/<stack>/). It runs in the program's process during
`up` (never in preview), off the event loop, and reports through `pulumi.log` (a progress line per change).

Where the numbers come from, best first:
- the run's status.json, when the network volume is reachable as a directory: LORASTACK_VOLUME_MOUNTS names a
  folder holding each volume under its id (an `rclone mount` of RunPod's S3 API does that; the emulator lays
  its volumes out the same way);
- otherwise the trainer's progress lines in the pod's log (GET /v2/pods/{id}/logs).
The run is over when the pod is no longer running (the trainer stops its pod on success, failure and limits).

The run's LoRA, samples, history and status come from the mounted volume, else RunPod's S3 API
(RUNPOD_S3_ACCESS_KEY / RUNPOD_S3_SECRET_KEY, through infra/runpod_backend/runs.py), laid out as `make fetch` lays
them out; with train.hfRepo set and neither, the LoRA alone comes from the Hugging Face Hub. Then report/ renders
grids, loss curve and report.html there (what exists: a Hub download has no samples). With none of these the output
says what to do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cloudapi.runpod_rest import LIVE_POD_STATUSES, NotFound, RunpodClient, RunpodError
from contract.workspace import RunPaths, read_json
from infra import paths as project_paths
from infra.backends import OpsError
from infra.hub import fetch_from_hub
from infra.progress import Progress, progress_from_status_file
from infra.runpod_backend import runs

ENV_VOLUME_MOUNTS = "LORASTACK_VOLUME_MOUNTS"
POLL_S = 2.0
AFTER_LIMIT_S = 15 * 60  # past the run's time limit the follower stops waiting: the reaper's turn


@dataclass
class RunOutcome:
    state: str  # the trainer's final state (succeeded, failed, limit, stalled, interrupted), or lost / timeout
    step: int | None
    total: int | None
    loss: float | None
    message: str
    lora: str | None  # where the LoRA was downloaded, when it was
    report: str | None = None  # the run's report.html there

    def as_output(self) -> dict:
        return asdict(self)


def mounted_volume(volume_id: str | None, environ: dict[str, str]) -> Path | None:
    root = environ.get(ENV_VOLUME_MOUNTS)
    if not (root and volume_id):
        return None
    path = Path(root) / volume_id
    return path if path.is_dir() else None


def progress_line(progress: Progress, pod_status: str) -> str:
    parts = [f"step {progress.step}/{progress.total}" if progress.step is not None else "setting up"]
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4f}")
    if progress.eta:
        parts.append(f"ETA {progress.eta}")
    if progress.cost_usd is not None:
        parts.append(f"cost ${progress.cost_usd:.2f}")
    return " ".join(parts) + f" (pod {pod_status}, trainer {progress.state or 'starting'}, from {progress.source})"


def follow_run(
    client: RunpodClient,
    pod_id: str,
    stack: str,
    run_id: str,
    *,
    volume_id: str | None,
    data_center: str | None,
    hf_repo: str | None,
    max_hours: float,
    report: Callable[[str], None],
    gpu: str | None = None,
    environ: dict[str, str] | None = None,
    outputs_dir: Path | None = None,
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
) -> RunOutcome:
    """Poll the pod and the run's progress until the pod stops; then fetch the LoRA when the run succeeded."""
    environ = dict(os.environ if environ is None else environ)
    volume = mounted_volume(volume_id, environ)
    paths = RunPaths(volume, run_id) if volume else None
    deadline = clock() + max_hours * 3600 + AFTER_LIMIT_S
    last_line, progress = None, Progress("nothing yet")
    while True:
        try:
            pod_status = client.get_pod(pod_id)["status"]
        except NotFound:
            pod_status = "TERMINATED"
        status_file = read_json(paths.status) if paths else None
        if status_file is not None and "state" in status_file:
            progress = progress_from_status_file(status_file)
        elif paths is None:
            progress = runs.progress_from_logs(client, pod_id) or progress
        line = progress_line(progress, pod_status)
        if line != last_line:
            report(line)
            last_line = line
        if pod_status not in LIVE_POD_STATUSES:
            break
        if clock() > deadline:
            message = (f"pod {pod_id} still {pod_status} {AFTER_LIMIT_S // 60} min past the run's time limit: "
                       "not waiting longer (`make reap` terminates pods past their limits)")
            report(message)
            return RunOutcome("timeout", progress.step, progress.total, progress.loss, message, None)
        time.sleep(poll_s)

    if progress.state and progress.state != "running":
        state = progress.state
    else:
        state = "lost" if pod_status == "TERMINATED" else "unknown"
    message = (status_file or {}).get("message") or f"pod {pod_id} is {pod_status}"
    if state != "succeeded":
        report(f"the run ended {state}: {message}")
        return RunOutcome(state, progress.step, progress.total, progress.loss, message, None)
    destination = (outputs_dir or project_paths.OUTPUTS_DIR) / stack
    if not fetch_run(stack, run_id, paths, volume_id, data_center, hf_repo, environ, destination, report):
        return RunOutcome(state, progress.step, progress.total, progress.loss, message, None)
    page = runs.render_run_report(destination, stack, run_id, gpu)
    report(f"report: {page}")
    return RunOutcome(state, progress.step, progress.total, progress.loss, message, str(destination), str(page))


def fetch_run(
    stack: str, run_id: str, paths: RunPaths | None, volume_id: str | None, data_center: str | None,
    hf_repo: str | None, environ: dict[str, str], destination: Path, report: Callable[[str], None],
) -> bool:
    """The run's files into `destination` (see the module docstring); False when they could not be had."""
    if paths is not None and paths.lora.is_dir():
        runs.copy_run(paths, destination)
    elif volume_id and data_center and runs.has_s3_keys(environ):
        try:
            written = runs.fetch_run_from_s3(volume_id, data_center, run_id, destination, environ)
        except Exception as error:  # botocore's errors share no base class; the run itself is done
            report(f"the S3 download failed ({type(error).__name__}: {error}); `make fetch STACK={stack}` tries again")
            return False
        if not any(path.suffix == ".safetensors" for path in written):
            report(f"nothing under {runs.lora_dir(run_id)}/ on volume {volume_id}")
            return False
    elif hf_repo:
        fetch_from_hub(hf_repo, destination, environ)
    else:
        report("the LoRA stays on the volume: " + runs.volume_steps(
            stack, runs.lora_dir(run_id), {"id": volume_id} if volume_id else None, data_center))
        return False
    report(f"LoRA downloaded to {destination}")
    return True


def follow_in_program(
    parent, stack: str, run_id: str, pod_id, volume_id, data_center, hf_repo: str | None, max_hours: float,
    gpu: str | None = None,
):
    """The follower as a step of `pulumi up`: an Output of the RunOutcome (None in preview)."""
    import asyncio

    import pulumi

    def follow(values: list, loop: asyncio.AbstractEventLoop) -> dict | None:
        def report(line: str) -> None:  # pulumi.log belongs to the program's event loop, not this thread
            loop.call_soon_threadsafe(lambda: pulumi.log.info(line, resource=parent))

        pod, volume, center = values
        api_key = runs.api_key(os.environ) or pulumi.runtime.get_config("lorastack:runpodApiKey")
        client = RunpodClient(api_key, timeout=runs.STATUS_READ_TIMEOUT_S)
        try:
            outcome = follow_run(client, pod, stack, run_id, volume_id=volume, data_center=center, hf_repo=hf_repo,
                                 max_hours=max_hours, report=report, gpu=gpu)
        except (RunpodError, OpsError, OSError) as error:
            report(f"could not follow the run: {error} (the pod goes on; `make status STACK={stack}`)")
            return None
        return outcome.as_output()

    async def in_background(values: list) -> dict | None:
        if pulumi.runtime.is_dry_run():  # a preview creates no pod: nothing to follow
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, follow, values, loop)

    return pulumi.Output.all(pod_id, volume_id, data_center).apply(in_background)
