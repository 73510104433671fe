"""`make status | logs | fetch | reap` for Vast.ai stacks: the instance through the REST API, the run through
its bucket (the instance destroys itself when done, so the bucket is where a finished run is read).

Credentials outside Pulumi: VAST_API_KEY, and the bucket's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from cloudapi.run_mirror import RunMirror
from cloudapi.vast_rest import LIVE_STATUSES, VastClient, VastError
from contract.naming import NAME_PREFIX, pod_name, run_id
from contract.spec import ENV_LIMITS, ENV_STACK, RunLimits
from infra.backends import OpsError, ReapDecision, Report, past_a_limit
from infra.credentials import SECRETS
from infra.vast_backend.config import section_of
from infra.vast_backend.marks import extra_env, is_ours

API_HINT = "(check VAST_API_KEY, and VAST_URL if set)"
LOG_POLL_S = 5.0


def api_key(environ: Mapping[str, str]) -> str | None:
    return environ.get(SECRETS["vastApiKey"]) or None


def vast_client(environ: Mapping[str, str], retries: int = 6) -> VastClient:
    key = api_key(environ)
    if not key:
        raise OpsError("VAST_API_KEY is not set: export it (Vast.ai console > Account > API Keys) for "
                       "make status/logs/reap; `pulumi config set --secret vastApiKey` covers only pulumi commands")
    return VastClient(key, retries=retries)


def bucket_mirror(config, environ: Mapping[str, str]) -> RunMirror:
    access, secret = (environ.get(SECRETS[name]) for name in ("bucketAccessKeyId", "bucketSecretAccessKey"))
    if not (access and secret):
        raise OpsError(f"{SECRETS['bucketAccessKeyId']} and {SECRETS['bucketSecretAccessKey']} are not set: export the "
                       f"keys of {section_of(config).bucket.url} (lorastack:vast.bucket) to read the run")
    bucket = section_of(config).bucket
    return RunMirror.from_settings(bucket.url, bucket.endpoint, aws_access_key_id=access, aws_secret_access_key=secret,
                                   **({"region_name": bucket.region} if bucket.region else {}))


def find_instances(client: VastClient, stack: str) -> list[dict]:
    """The stack's instances (ours, by label), newest first."""
    label = pod_name(stack)
    found = [instance for instance in client.list_instances(label=label) if is_ours(instance)]
    return sorted(found, key=lambda instance: instance.get("start_date") or 0, reverse=True)


def _named(action: str, error: VastError) -> OpsError:
    return OpsError(f"{action}: {error} {API_HINT}")


def run_status(stack: str, config, environ: Mapping[str, str]) -> dict | None:
    """status.json from the bucket (the trainer mirrors it with each checkpoint and at the end), or None."""
    mirror = bucket_mirror(config, environ)
    with tempfile.TemporaryDirectory() as folder:
        key = mirror.run_key(run_id(stack, config.train), "status.json")
        target = Path(folder) / "status.json"
        try:
            mirror.client.download_file(mirror.bucket, key, str(target))
        except Exception:  # absent until the first checkpoint: said as "no status yet"
            return None
        return json.loads(target.read_text())


def status(stack: str, config, environ: Mapping[str, str]) -> Report:
    try:
        instances = find_instances(vast_client(environ), stack)
    except VastError as error:
        raise _named("listing instances", error) from None
    lines = [f"{stack}: instance {i['id']} {i.get('actual_status') or 'provisioning'} on machine "
             f"{i.get('machine_id')}, ${float(i.get('dph_total') or 0):.3f}/h" for i in instances]
    if not instances:
        lines.append(f"{stack}: no instance labelled {pod_name(stack)} (not started, or done: it destroys itself)")
    if len(instances) > 1:
        lines.append(f"WARNING: {len(instances)} instances are labelled {pod_name(stack)}; make reap destroys strays")
    run = run_status(stack, config, environ)
    if run is None:
        lines.append(f"{stack}: no status.json in {section_of(config).bucket.url} yet (written with the first checkpoint)")
    else:
        lines.append(f"{stack}: run {run_id(stack, config.train)} {run.get('state', '?')} at step "
                     f"{run.get('step', '?')}/{run.get('total', config.train.steps)}: {run.get('message', '')}".rstrip(": "))
    return Report(lines)


def logs(stack: str, config, environ: Mapping[str, str], emit: Callable[[str], None],
         poll_s: float = LOG_POLL_S) -> Report:
    """The container log through request_logs, polled until the instance is gone or no longer running."""
    client = vast_client(environ)
    try:
        instances = find_instances(client, stack)
        if not instances:
            raise OpsError(f"no instance labelled {pod_name(stack)}: start one with make train STACK={stack}")
        instance_id = instances[0]["id"]
        emit(f"-- following instance {instance_id}; Ctrl-C stops")
        shown = 0
        while True:
            lines = client.logs(instance_id).splitlines()
            for line in lines[shown:]:
                emit(line)
            shown = max(shown, len(lines))
            try:
                state = client.get_instance(instance_id).get("actual_status")
            except VastError:
                state = None
                break
            if state not in LIVE_STATUSES:
                break
            time.sleep(poll_s)
    except VastError as error:
        raise _named("reading the log", error) from None
    return Report([f"-- instance {instance_id} is {state or 'gone'}"])


def fetch(stack: str, config, destination: Path, environ: Mapping[str, str]) -> Report:
    mirror = bucket_mirror(config, environ)
    run = run_id(stack, config.train)
    with_lora = mirror.run_key(run, "lora") + "/"
    staging = destination.parent / f".{destination.name}.fetching"
    count = mirror.pull_files(run, staging)
    lora = staging / "lora"
    if not lora.is_dir():
        raise OpsError(f"no LoRA under s3://{mirror.bucket}/{with_lora} yet: the run has not exported it "
                       f"(make status STACK={stack})")
    shutil.copytree(lora, destination, dirs_exist_ok=True)
    lines = [] if (staging / "DONE").exists() else ["note: the run has not finished (no DONE in the bucket)"]
    shutil.rmtree(staging, ignore_errors=True)
    return Report([*lines, f"{stack}: LoRA downloaded from s3://{mirror.bucket}/{with_lora} ({count} run files read) "
                           f"into {destination}"])


# --- reap -----------------------------------------------------------------------------------------------------


def decide(instance: dict, live_stacks: set[str], now: datetime, grace_minutes: float) -> ReapDecision:
    """Destroy one of ours when its stack is not live; when no trainer runs in it (exited, offline: its disk
    still bills); or when it runs past its limits (LORASTACK_LIMITS) by more than the grace."""
    env = extra_env(instance)
    stack = env.get(ENV_STACK) or str(instance.get("label", ""))[len(NAME_PREFIX):]
    state = instance.get("actual_status")
    started = instance.get("start_date")
    hours = max(now.timestamp() - float(started), 0.0) / 3600 if started else None
    usd_per_hour = float(instance.get("dph_total") or 0.0)
    cost = hours * usd_per_hour if hours is not None else None

    def decision(destroy: bool, reason: str) -> ReapDecision:
        return ReapDecision(str(instance["id"]), stack, str(state), hours, cost, destroy, reason)

    if stack not in live_stacks:
        return decision(True, f"no live stack {stack!r}")
    if state not in LIVE_STATUSES:
        return decision(True, f"{state}: no trainer runs in it, and its disk bills until it is destroyed")
    try:
        limits = RunLimits.model_validate_json(env.get(ENV_LIMITS) or "")
    except ValidationError:
        return decision(True, f"running without readable limits ({ENV_LIMITS})")
    reason = past_a_limit(hours, cost, limits.max_hours, limits.max_cost_usd, usd_per_hour, grace_minutes)
    return decision(reason is not None, reason or "within its limits")


def reap(client: VastClient, live_stacks: set[str], *, dry_run: bool, now: datetime,
         grace_minutes: float) -> list[ReapDecision]:
    ours = [instance for instance in client.list_instances()
            if str(instance.get("label", "")).startswith(NAME_PREFIX) and is_ours(instance)]
    decisions = [decide(instance, live_stacks, now, grace_minutes) for instance in ours]
    if not dry_run:
        for decision in decisions:
            if decision.terminate:
                client.destroy_instance(decision.resource_id)
    return decisions
