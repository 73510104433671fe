"""The reaper's rules for RunPod pods: which of ours to terminate (infra/reaper.py is the command around them).

A pod is ours when its name starts with `lorastack-` (contract.naming.NAME_PREFIX) and its env has
LORASTACK_MANAGED=1; other pods are never touched. One of ours is terminated when
- its stack is not live (not among the live stacks the reaper was given);
- it is running (or in ERROR, which RunPod bills too) past its limits (LORASTACK_LIMITS in its env) by more
  than the grace: hours since the API's startedAt (createdAt when absent) over maxHours, or those hours at the
  pod's price over maxCostUsd;
- it is running with no readable limits (every lorastack pod must carry them).
A stopped pod of a live stack is left alone: it bills no GPU, and it is in its stack's state.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import ValidationError

from cloudapi.runpod_rest import LIVE_POD_STATUSES, RunpodClient
from contract.naming import NAME_PREFIX
from contract.spec import ENV_LIMITS, ENV_MANAGED, ENV_STACK, RunLimits
from infra.backends import ReapDecision, past_a_limit

# What RunPod bills: a pod's cost is 0.0 only when EXITED or TERMINATED. An ERROR pod is billed, and no trainer
# runs in it to stop it: the limits hold for it as for a running one.
BILLED_STATUSES = (*LIVE_POD_STATUSES, "ERROR")


def is_managed(pod: dict) -> bool:
    return str(pod.get("name", "")).startswith(NAME_PREFIX) and (pod.get("env") or {}).get(ENV_MANAGED) == "1"


def stack_of(pod: dict) -> str:
    return (pod.get("env") or {}).get(ENV_STACK) or pod["name"][len(NAME_PREFIX):]


def _hours_running(pod: dict, now: datetime) -> float | None:
    started = pod.get("startedAt") or pod.get("createdAt")
    if not started:
        return None
    begun = datetime.fromisoformat(started.replace("Z", "+00:00"))
    return max((now - begun).total_seconds() / 3600, 0.0)


def decide(pod: dict, live_stacks: set[str], now: datetime, grace_minutes: float) -> ReapDecision:
    stack, status = stack_of(pod), pod.get("status", "?")
    running = status in BILLED_STATUSES
    hours = _hours_running(pod, now) if running else None
    usd_per_hour = float(pod.get("cost") or 0.0)
    cost = hours * usd_per_hour if hours is not None else None

    def decision(terminate: bool, reason: str) -> ReapDecision:
        return ReapDecision(pod["id"], stack, status, hours, cost, terminate, reason)

    if stack not in live_stacks:
        return decision(True, f"no live stack {stack!r}")
    if not running:
        return decision(False, "stopped (bills no GPU; in its stack's state)")
    try:
        limits = RunLimits.model_validate_json((pod.get("env") or {}).get(ENV_LIMITS) or "")
    except ValidationError:
        return decision(True, f"running without readable limits ({ENV_LIMITS})")
    reason = past_a_limit(hours, cost, limits.max_hours, limits.max_cost_usd, usd_per_hour, grace_minutes)
    return decision(reason is not None, reason or "within its limits")


def reap(client: RunpodClient, live_stacks: set[str], *, dry_run: bool, now: datetime,
         grace_minutes: float) -> list[ReapDecision]:
    decisions = [decide(pod, live_stacks, now, grace_minutes) for pod in client.list_pods() if is_managed(pod)]
    if not dry_run:
        for decision in decisions:
            if decision.terminate:
                client.terminate_pod(decision.resource_id)
    return decisions
