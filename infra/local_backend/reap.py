"""The reaper's rules for local containers: which of ours to end (infra/reaper.py is the command around them).

A container is ours when it carries the label `lorastack.managed=1`; others are never touched. One of ours is
stopped and removed when
- its stack is not live (not among the live stacks the reaper was given) and it is running;
- it is running past its limits (LORASTACK_LIMITS in its env) by more than the grace: hours since the engine's
  StartedAt over maxHours, or those hours at the stack's usdPerHour over maxCostUsd;
- it is running with no readable limits (every lorastack container must carry them).
A container that has exited uses nothing: it is left for its stack's `pulumi destroy` (or refresh) to remove.
"""

from __future__ import annotations

import functools
from datetime import datetime

from pydantic import ValidationError

from contract.spec import ENV_LIMITS, RunLimits
from infra.backends import ReapDecision, past_a_limit
from infra.local_backend import engine
from infra.local_backend.engine import MANAGED_LABEL, STACK_LABEL

RUNNING_STATES = ("running", "restarting", "paused")
STOP_TIMEOUT_S = 60


def environment(attrs: dict) -> dict[str, str]:
    pairs = (entry.partition("=") for entry in (attrs.get("Config") or {}).get("Env") or [])
    return {name: value for name, _, value in pairs}


def _hours_running(attrs: dict, now: datetime) -> float | None:
    started = (attrs.get("State") or {}).get("StartedAt") or ""
    if not started or started.startswith("0001-"):  # the engine's zero time: never started
        return None
    # the engine writes nanoseconds; fromisoformat takes at most microseconds
    head, _, fraction = started.rstrip("Z").partition(".")
    begun = datetime.fromisoformat(f"{head}.{(fraction or '0')[:6]}+00:00")
    return max((now - begun).total_seconds() / 3600, 0.0)


def decide(attrs: dict, live_stacks: set[str], now: datetime, grace_minutes: float) -> ReapDecision:
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    stack = labels.get(STACK_LABEL) or attrs.get("Name", "").lstrip("/")
    status = (attrs.get("State") or {}).get("Status", "?")
    running = status in RUNNING_STATES
    hours = _hours_running(attrs, now) if running else None
    env = environment(attrs)
    try:
        limits = RunLimits.model_validate_json(env.get(ENV_LIMITS) or "")
    except ValidationError:
        limits = None
    usd_per_hour = limits.usd_per_hour if limits else 0.0
    cost = hours * usd_per_hour if hours is not None else None

    def decision(terminate: bool, reason: str) -> ReapDecision:
        return ReapDecision(attrs["Id"][:12], stack, status, hours, cost, terminate, reason)

    if not running:
        return decision(False, "exited (uses no GPU; `pulumi destroy` of its stack removes it)")
    if stack not in live_stacks:
        return decision(True, f"no live stack {stack!r}")
    if limits is None:
        return decision(True, f"running without readable limits ({ENV_LIMITS})")
    reason = past_a_limit(hours, cost, limits.max_hours, limits.max_cost_usd, usd_per_hour, grace_minutes)
    return decision(reason is not None, reason or "within its limits")


def reap(client, live_stacks: set[str], *, dry_run: bool, now: datetime, grace_minutes: float) -> list[ReapDecision]:
    containers = engine.call(lambda: client.containers.list(all=True, filters={"label": f"{MANAGED_LABEL}=1"}))
    by_id = {container.short_id: container for container in containers}
    decisions = [decide(container.attrs, live_stacks, now, grace_minutes) for container in containers]
    if not dry_run:
        for decision in decisions:
            if decision.terminate:
                container = by_id[decision.resource_id]
                engine.call(functools.partial(container.stop, timeout=STOP_TIMEOUT_S))  # SIGTERM: the trainer checkpoints
                engine.call(functools.partial(container.remove, force=True))
    return decisions
