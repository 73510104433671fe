"""`make status|logs|fetch STACK=name` (`python -m infra.ops status|logs|fetch STACK`): follow a run, get its LoRA.

The stack's pod is found by name (`contract.naming.pod_name(stack)`) in the RunPod API's pod list. Progress comes from
`runs/<run-id>/status.json` when the network volume is mounted here (LORASTACK_WORKSPACE points at it, as
on a pod or in `make demo`), otherwise from the newest progress record in the pod's log stream, the JSON line
the trainer prints with each progress update (`contract.progress`).

`fetch` downloads the LoRA into outputs/<stack>/: from the Hugging Face Hub when train.hfRepo is set, from
the volume when it is mounted here, else through RunPod's S3-compatible API for network volumes (boto3,
with an S3 API key), and when none of these is possible it prints the steps that reach the files.
Every credential a command needs is named, with where to set it, when it is missing; none is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import requests

from contract.naming import pod_name, run_id
from contract.progress import Progress, parse_progress
from infra.config import StackConfig
from infra.credentials import SECRETS
from infra.stack_files import STACKS_DIR, StackError, load_stack
from cloudapi.runpod_rest import RunpodClient, RunpodError
from contract.spec import ENV_WORKSPACE
from contract.workspace import RunPaths, read_json, workspace_root

OUTPUTS_DIR = STACKS_DIR.parent / "outputs"
LIVE_STATES = ("PROVISIONING", "STARTING", "RUNNING")
STATUS_LOG_TAIL = 500  # lines of backfill searched for the newest progress line
STATUS_READ_TIMEOUT_S = 3.0  # a live stream goes quiet after its backfill: stop reading there
STATUS_DEADLINE_S = 10.0  # and never read a chatty stream for longer than this
FOLLOW_READ_TIMEOUT_S = 120.0  # `logs` reconnects after this long without a line
S3_ACCESS_KEY_ENV = "RUNPOD_S3_ACCESS_KEY"  # RunPod S3 API key: access key (user_...)
S3_SECRET_KEY_ENV = "RUNPOD_S3_SECRET_KEY"  # and its secret (rps_...)
S3_ENDPOINT_ENV = "RUNPOD_S3_ENDPOINT_URL"  # overrides https://s3api-<dc>.runpod.io (tests, new data centers)

class OpsError(Exception):
    """A problem a person can act on; printed as one message, exit status 2."""


def parse_progress_line(line: str) -> Progress | None:
    """The trainer's progress record in one pod log line (contract/progress.py), or None for any other line."""
    return parse_progress(line, source="pod log")


def progress_from_status_file(status: dict) -> Progress:
    eta = status.get("eta_seconds")
    return Progress(
        "status.json", status.get("state"), status.get("step"), status.get("total"), status.get("loss"),
        status.get("seconds_per_step"), None if eta is None else _format_seconds(eta), status.get("cost_usd"),
    )


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


# --- finding things -------------------------------------------------------------------------------------------


def runpod_client(timeout: float = 30.0, environ: dict[str, str] | None = None) -> RunpodClient:
    environ = os.environ if environ is None else environ
    key = environ.get(SECRETS["runpodApiKey"])
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


def local_status(stack: str, config: StackConfig, environ: dict[str, str] | None = None) -> dict | None:
    """status.json when the volume is mounted here (LORASTACK_WORKSPACE set)."""
    environ = os.environ if environ is None else environ
    if not environ.get(ENV_WORKSPACE):
        return None
    return read_json(RunPaths(workspace_root(environ), run_id(stack, config.train)).status)


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


def _cost_so_far(pod: dict) -> float | None:
    """$/hour x time since start, for a live pod whose trainer has not reported a cost yet."""
    started, usd_per_hour = pod.get("startedAt"), pod.get("cost")
    if not started or not usd_per_hour or pod.get("status") not in LIVE_STATES:
        return None
    begun = datetime.fromisoformat(started.replace("Z", "+00:00"))
    return (datetime.now(timezone.utc) - begun).total_seconds() / 3600 * usd_per_hour


# --- status ---------------------------------------------------------------------------------------------------

STATUS_COLUMNS = ("pod", "state", "step", "loss", "s/step", "ETA", "cost so far", "progress from")


def status_rows(pods: list[dict], progress: dict[str, Progress | None]) -> list[tuple[str, ...]]:
    rows = []
    for pod in pods:
        found = progress.get(pod["id"])
        state = pod.get("status", "?")
        if found is not None and found.state and found.state != "running":
            state = f"{state} ({found.state})"  # e.g. EXITED (succeeded): the trainer stopped its pod
        if found is not None and found.cost_usd is not None:
            cost = f"${found.cost_usd:.2f}"
        else:
            estimated = _cost_so_far(pod)
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


def render_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    table = [columns, *rows]
    widths = [max(len(line[index]) for line in table) for index in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def command_status(stack: str, config: StackConfig, out: TextIO) -> int:
    if config.provider != "runpod":
        raise OpsError(_replicate_pointer(config, "status"))
    client = runpod_client(timeout=STATUS_READ_TIMEOUT_S)
    print(f"looking up {pod_name(stack)} ...", file=sys.stderr, flush=True)
    pods = find_pods(client, stack)
    if not pods:
        print(f"{stack}: no pod named {pod_name(stack)}: not started yet (make train STACK={stack}) or already "
              f"terminated (make fetch STACK={stack} for its LoRA)", file=out)
        return 0
    status_file = local_status(stack, config)
    progress: dict[str, Progress | None] = {}
    for pod in pods:
        if status_file is not None and pod is pods[0]:
            progress[pod["id"]] = progress_from_status_file(status_file)
        else:
            print(f"reading the log of pod {pod['id']} ...", file=sys.stderr, flush=True)
            progress[pod["id"]] = progress_from_logs(client, pod["id"])
    print(render_table(STATUS_COLUMNS, status_rows(pods, progress)), file=out)
    if len(pods) > 1:
        print(f"WARNING: {len(pods)} pods are named {pod_name(stack)}; the older ones still bill while running "
              "(make reap terminates strays)", file=out)
    return 0


# --- logs -----------------------------------------------------------------------------------------------------


def follow_logs(client: RunpodClient, pod_id: str, out: TextIO, tail: int = 100) -> None:
    """Print the pod's log as it comes; reconnect after a quiet spell; return when the pod has stopped."""
    while True:
        try:
            for event in client.pod_logs(pod_id, tail=tail):
                print(event.get("line", ""), file=out, flush=True)
        except (requests.RequestException, RunpodError):
            pass  # quiet for FOLLOW_READ_TIMEOUT_S or dropped: look at the pod, then reconnect
        state = client.get_pod(pod_id).get("status")
        if state not in LIVE_STATES:
            print(f"-- pod {pod_id} is {state}: the log has ended", file=out, flush=True)
            return
        tail = 0  # reconnect live, without replaying the backfill


def command_logs(stack: str, config: StackConfig, out: TextIO) -> int:
    if config.provider != "runpod":
        raise OpsError(_replicate_pointer(config, "logs"))
    client = runpod_client(timeout=FOLLOW_READ_TIMEOUT_S)
    pods = find_pods(client, stack)
    if not pods:
        raise OpsError(f"no pod named {pod_name(stack)}: start one with make train STACK={stack}")
    print(f"-- following pod {pods[0]['id']} ({pods[0].get('status')}); Ctrl-C stops", file=out, flush=True)
    try:
        follow_logs(client, pods[0]["id"], out)
    except KeyboardInterrupt:
        print("", file=out)  # end the line ^C left; leaving is what was asked for, not an error
    return 0


# --- fetch ----------------------------------------------------------------------------------------------------


def fetch_from_hub(repo_id: str, destination: Path, environ: dict[str, str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    token = environ.get(SECRETS["hfToken"]) or None
    print(f"downloading {repo_id} from the Hugging Face Hub into {destination} ...", file=sys.stderr, flush=True)
    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="model", local_dir=destination, token=token))
    except RepositoryNotFoundError:
        hint = "" if token else " (it is private, as the trainer creates it: export HF_TOKEN=<token with read access>)"
        raise OpsError(f"Hub repo {repo_id} not found or not readable{hint}") from None
    except HfHubHTTPError as error:
        raise OpsError(f"download of {repo_id} failed: {error}") from None


def s3_endpoint(data_center: str, environ: dict[str, str]) -> str:
    return environ.get(S3_ENDPOINT_ENV) or f"https://s3api-{data_center.lower()}.runpod.io"


def fetch_from_s3(volume_id: str, data_center: str, prefix: str, destination: Path, environ: dict[str, str],
                  make_client=None) -> list[Path]:
    """Every object under `prefix` on the volume (the S3 bucket is the volume id), into `destination`."""
    if make_client is None:
        import boto3  # a dependency of runpod==1.12 (the infra extra)

        make_client = boto3.client
    s3 = make_client(
        "s3",
        aws_access_key_id=environ[S3_ACCESS_KEY_ENV],
        aws_secret_access_key=environ[S3_SECRET_KEY_ENV],
        region_name=data_center,  # RunPod's S3 API takes the data center id as the region
        endpoint_url=s3_endpoint(data_center, environ),
    )
    written = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=volume_id, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix):].lstrip("/")
            if not relative or relative.endswith("/"):
                continue  # RunPod lists directories as objects too
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            print(f"  {relative} ({item.get('Size', 0) / 1e6:.1f} MB)", file=sys.stderr, flush=True)
            body = s3.get_object(Bucket=volume_id, Key=item["Key"])["Body"]
            partial = target.with_name(target.name + ".part")
            with partial.open("wb") as handle:
                for chunk in body.iter_chunks(1 << 20):
                    handle.write(chunk)
            partial.replace(target)  # a file in outputs/ is whole or absent
            written.append(target)
    return written


def find_volume(client: RunpodClient, stack: str, config: StackConfig) -> dict | None:
    """The stack's network volume: the one its pod mounts, else the one named like the pod in its data center."""
    for pod in find_pods(client, stack):
        network = (pod.get("mounts") or {}).get("network") or []
        if network:
            return client.get_volume(network[0]["volumeId"])
    data_center = config.runpod.data_center
    return next((volume for volume in client.list_volumes()
                 if volume.get("name") == pod_name(stack) and volume.get("dataCenter") == data_center), None)


def volume_steps(stack: str, lora_dir: str, volume: dict | None, data_center: str | None) -> str:
    volume_id = volume["id"] if volume else "<volume id: RunPod console > Storage>"
    dc = data_center or "<data center>"
    return "\n".join([
        f"The LoRA of {stack} is on its RunPod network volume, in /workspace/{lora_dir}/. Two ways to reach it:",
        "  1. RunPod's S3-compatible API (no pod needed; some data centers only, see docs.runpod.io/storage/s3-api):",
        "     create an S3 API key (RunPod console > Settings > S3 API Keys), then",
        f"       export {S3_ACCESS_KEY_ENV}=user_...  {S3_SECRET_KEY_ENV}=rps_...",
        f"       make fetch STACK={stack}",
        "     or with the AWS CLI:",
        f"       aws s3 cp --recursive --region {dc} --endpoint-url https://s3api-{dc.lower()}.runpod.io "
        f"s3://{volume_id}/{lora_dir}/ outputs/{stack}/",
        "  2. A running pod that mounts the volume (billed while it runs): in the RunPod console deploy a small pod in",
        f"     {dc} with network volume {volume_id}, then copy /workspace/{lora_dir}/ out with `runpodctl send` or",
        "     scp over the pod's SSH port, and terminate the pod.",
    ])


def command_fetch(stack: str, config: StackConfig, out: TextIO, environ: dict[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    destination = OUTPUTS_DIR / stack
    if config.train.hf_repo:
        fetch_from_hub(config.train.hf_repo, destination, environ)
        print(f"{stack}: LoRA from https://huggingface.co/{config.train.hf_repo} in {destination}", file=out)
        return 0
    if config.provider != "runpod":
        raise OpsError(_replicate_pointer(config, "fetch"))

    paths = RunPaths(workspace_root(environ), run_id(stack, config.train))
    lora_dir = paths.lora.relative_to(paths.root).as_posix()
    if environ.get(ENV_WORKSPACE):
        if not paths.lora.is_dir():
            raise OpsError(f"no LoRA yet in {paths.lora} ({ENV_WORKSPACE} is set): the run has not exported it")
        if not paths.done.exists():
            print(f"note: {paths.done} is missing: the run has not finished; copying what is there", file=out)
        shutil.copytree(paths.lora, destination, dirs_exist_ok=True)
        print(f"{stack}: LoRA copied from {paths.lora} into {destination}", file=out)
        return 0

    client = runpod_client(environ=environ)
    volume = find_volume(client, stack, config)
    data_center = volume["dataCenter"] if volume else config.runpod.data_center
    if volume is None or not (environ.get(S3_ACCESS_KEY_ENV) and environ.get(S3_SECRET_KEY_ENV)):
        missing = "no network volume of this stack was found" if volume is None else (
            f"{S3_ACCESS_KEY_ENV} and {S3_SECRET_KEY_ENV} are not set")
        print(f"{stack}: cannot download the LoRA directly: {missing}.\n", file=out)
        print(volume_steps(stack, lora_dir, volume, data_center), file=out)
        return 2
    print(f"downloading s3://{volume['id']}/{lora_dir}/ from RunPod's S3 API ({data_center}) into {destination} ...",
          file=sys.stderr, flush=True)
    try:
        written = fetch_from_s3(volume["id"], data_center, lora_dir + "/", destination, environ)
    except Exception as error:  # botocore's errors share no base class with requests'; each is reported alike
        raise OpsError(f"the S3 download failed ({type(error).__name__}: {error})\n\n"
                       + volume_steps(stack, lora_dir, volume, data_center)) from None
    if not written:
        raise OpsError(f"nothing under {lora_dir}/ on volume {volume['id']}: the run has not exported its LoRA yet "
                       f"(make status STACK={stack})")
    print(f"{stack}: {len(written)} files of the LoRA in {destination}", file=out)
    return 0


def _replicate_pointer(config: StackConfig, command: str) -> str:
    replicate = config.replicate
    return (f"`make {command}` follows RunPod pods; this stack trains on Replicate: see "
            f"https://replicate.com/{replicate.owner}/{replicate.model} (its trainings and versions), or "
            "`pulumi stack output --stack <stack>` for the training id")


# --- entry ----------------------------------------------------------------------------------------------------

COMMANDS = {"status": command_status, "logs": command_logs, "fetch": command_fetch}


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.ops", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("stack", nargs="?", help="the stack name (stacks/Pulumi.<name>.yaml)")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    if not args.stack:
        print(f"name a stack: make {args.command} STACK=sdxl-4090 (files in stacks/)", file=sys.stderr)
        return 2
    try:
        config = load_stack(args.stack)
    except StackError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args.stack, config, out)
    except OpsError as error:
        print(error, file=sys.stderr)
        return 2
    except RunpodError as error:
        print(f"{error} (check RUNPOD_API_KEY, and RUNPOD_API_BASE_URL if set)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
