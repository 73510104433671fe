"""`make status | logs | fetch | reap` for Hugging Face Jobs stacks: the stack's jobs found by our labels, the LoRA
downloaded from the checkpoint repo.

A job is ours when its labels carry LORASTACK_MANAGED=1; its stack is the LORASTACK_STACK label. The reaper
cancels one of ours that bills (SCHEDULING or RUNNING) when its stack is not live, or past its limits by more
than the grace (hours since createdAt over maxHours, or those hours at the flavor's price over maxCostUsd). Its
timeout stops it anyway; the reaper catches a job whose timeout was set by hand or by an older release.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from contract.naming import run_id
from contract.spec import ENV_LIMITS, ENV_MANAGED, RunLimits
from contract.workspace import RunPaths
from infra.backends import OpsError, ReapDecision, Report, past_a_limit
from infra.credentials import SECRETS
from infra.hfjobs_backend.catalog import HFJOBS_FLAVORS
from infra.hfjobs_backend.client import BILLED_STAGES, LABEL_STACK, TERMINAL_STAGES, HfJobs, endpoint
from infra.hfjobs_backend.config import section_of

TOKEN_HINT = "export HF_TOKEN (a token that may start Jobs: huggingface.co/settings/tokens)"


def client(environ: Mapping[str, str], namespace: str | None = None) -> HfJobs:
    token = environ.get(SECRETS["hfToken"])
    if not token:
        raise OpsError(f"HF_TOKEN is not set: {TOKEN_HINT}")
    return HfJobs(token, namespace, retries=2, environ=environ)


def stack_jobs(jobs: HfJobs, stack: str) -> list:
    """The stack's jobs, newest first."""
    found = jobs.list({ENV_MANAGED: "1", LABEL_STACK: stack})
    return sorted(found, key=lambda job: job.created_at or datetime.min.replace(tzinfo=UTC), reverse=True)


def status(stack: str, config, environ: Mapping[str, str]) -> Report:
    jobs = client(environ, section_of(config).namespace)
    found = stack_jobs(jobs, stack)
    if not found:
        return Report([f"{stack}: no job on Hugging Face Jobs (namespace {jobs.namespace})"], code=1)
    lines = []
    for job in found:
        message = f" ({job.status.message})" if job.status.message else ""
        lines.append(f"{stack}: job {job.id} {job.status.stage}{message}, {job.flavor}, created "
                     f"{job.created_at:%Y-%m-%d %H:%M UTC} {job.url}")
    return Report(lines)


def logs(stack: str, config, environ: Mapping[str, str], emit: Callable[[str], None]) -> Report:
    jobs = client(environ, section_of(config).namespace)
    found = stack_jobs(jobs, stack)
    if not found:
        raise OpsError(f"{stack}: no job on Hugging Face Jobs (namespace {jobs.namespace}): nothing to follow")
    job = found[0]
    for line in jobs.logs(job.id, follow=job.status.stage not in TERMINAL_STAGES):
        emit(line)
    return Report([f"{stack}: job {job.id} {jobs.inspect(job.id).status.stage}"])


def fetch(stack: str, config, destination: Path, environ: Mapping[str, str]) -> Report:
    """The run's LoRA folder (`runs/<run id>/lora/`) from the checkpoint repo into `destination`."""
    from huggingface_hub import snapshot_download

    token = environ.get(SECRETS["hfToken"])
    if not token:
        raise OpsError(f"HF_TOKEN is not set: {TOKEN_HINT} (the checkpoint repo is private)")
    repo = section_of(config).checkpoint_repo.repo_id
    paths = RunPaths(Path("/"), run_id(stack, config.train))
    lora = paths.lora.relative_to(paths.root).as_posix()
    print(f"downloading {lora}/ of the Hub repo {repo} into {destination} ...", file=sys.stderr, flush=True)
    staging = destination / ".download"
    snapshot_download(repo_id=repo, repo_type="model", allow_patterns=[f"{lora}/*"], local_dir=str(staging),
                      token=token, endpoint=endpoint(environ))
    source = staging / lora
    if not source.is_dir():
        raise OpsError(f"{stack}: no LoRA in {endpoint(environ)}/{repo} under {lora}/ yet: the run has not exported "
                       "it (`make status` says where it is)")
    written = []
    for file in sorted(source.rglob("*")):
        if file.is_file():
            target = destination / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            file.replace(target)
            written.append(target)
    return Report([f"{stack}: {len(written)} LoRA files from {endpoint(environ)}/{repo} into {destination}"])


def _limits(job) -> RunLimits | None:
    try:
        return RunLimits.model_validate_json((job.environment or {}).get(ENV_LIMITS, ""))
    except ValueError:
        return None


def decide(job, live_stacks: set[str], now: datetime, grace_minutes: float) -> ReapDecision:
    stack, stage = (job.labels or {}).get(LABEL_STACK, "?"), job.status.stage
    billed = stage in BILLED_STAGES
    hours = max((now - job.created_at).total_seconds() / 3600, 0.0) if billed and job.created_at else None
    flavor = HFJOBS_FLAVORS.get(job.flavor)
    cost = hours * flavor.usd_per_hour if hours is not None and flavor else None
    limits = _limits(job)

    def decision(terminate: bool, reason: str) -> ReapDecision:
        return ReapDecision(job.id, stack, stage, hours, cost, terminate, reason)

    if not billed:
        return decision(False, f"{stage}: not billed")
    if stack not in live_stacks:
        return decision(True, f"stack {stack} is not live: an orphan")
    if limits is None:
        return decision(True, f"no readable {ENV_LIMITS} in its environment")
    usd_per_hour = flavor.usd_per_hour if flavor else 0.0
    reason = past_a_limit(hours, cost, limits.max_hours, limits.max_cost_usd, usd_per_hour, grace_minutes)
    return decision(reason is not None, reason or "within its limits")


def reap(jobs: HfJobs, live_stacks: set[str], *, dry_run: bool, now: datetime,
         grace_minutes: float) -> list[ReapDecision]:
    decisions = []
    for job in jobs.list({ENV_MANAGED: "1"}):
        decided = decide(job, live_stacks, now, grace_minutes)
        if decided.terminate and not dry_run:
            jobs.cancel(job.id)
        decisions.append(decided)
    return decisions
