"""The reaper's rules for Lambda Cloud instances, and the tags they read.

An instance is ours when its name starts with `lorastack-` (contract.naming.NAME_PREFIX) and it carries the tag
lorastack-managed=1; other instances are never touched. Lambda has no stop state, so every instance that is not
on its way out is billed. One of ours is terminated when
- its stack (tag lorastack-stack) is not live;
- it has no readable limits (tags lorastack-max-hours, lorastack-max-cost-usd) or launch time;
- the hours since its launch (tag lorastack-launched-at, set by the provider at launch: the API reports no launch
  time) are past maxHours, or those hours at its type's price are past maxCostUsd, by more than the grace.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cloudapi.lambda_rest import GONE_STATUSES, LambdaClient
from contract.naming import NAME_PREFIX
from contract.spec import RunLimits
from infra.backends import ReapDecision, past_a_limit

TAG_MANAGED, TAG_STACK = "lorastack-managed", "lorastack-stack"
TAG_MAX_HOURS, TAG_MAX_COST = "lorastack-max-hours", "lorastack-max-cost-usd"
TAG_LAUNCHED_AT = "lorastack-launched-at"


def tags(stack: str, limits: RunLimits) -> list[dict[str, str]]:
    """The instance's tags as the stack declares them (the launch time is added by the provider)."""
    return [{"key": TAG_MANAGED, "value": "1"}, {"key": TAG_STACK, "value": stack},
            {"key": TAG_MAX_HOURS, "value": f"{limits.max_hours:g}"},
            {"key": TAG_MAX_COST, "value": f"{limits.max_cost_usd:g}"}]


def launched_at_tag(now: datetime) -> dict[str, str]:
    return {"key": TAG_LAUNCHED_AT, "value": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def tag_values(instance: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in instance.get("tags") or []}


def is_managed(instance: dict) -> bool:
    return str(instance.get("name", "")).startswith(NAME_PREFIX) and tag_values(instance).get(TAG_MANAGED) == "1"


def stack_of(instance: dict) -> str:
    return tag_values(instance).get(TAG_STACK) or instance["name"][len(NAME_PREFIX):]


def hours_since_launch(instance: dict, now: datetime) -> float | None:
    launched = tag_values(instance).get(TAG_LAUNCHED_AT)
    try:
        begun = datetime.fromisoformat(launched.replace("Z", "+00:00")) if launched else None
    except ValueError:
        return None
    return max((now - begun).total_seconds() / 3600, 0.0) if begun else None


def decide(instance: dict, live_stacks: set[str], now: datetime, grace_minutes: float) -> ReapDecision:
    stack, status, values = stack_of(instance), instance["status"], tag_values(instance)
    hours = hours_since_launch(instance, now)
    usd_per_hour = instance["instance_type"]["price_cents_per_hour"] / 100
    cost = hours * usd_per_hour if hours is not None else None

    def decision(terminate: bool, reason: str) -> ReapDecision:
        return ReapDecision(instance["id"], stack, status, hours, cost, terminate, reason)

    if stack not in live_stacks:
        return decision(True, f"no live stack {stack!r}")
    try:
        max_hours, max_cost = float(values[TAG_MAX_HOURS]), float(values[TAG_MAX_COST])
    except (KeyError, ValueError):
        return decision(True, f"billed without readable limits (tags {TAG_MAX_HOURS}, {TAG_MAX_COST})")
    if hours is None:
        return decision(True, f"billed without a readable launch time (tag {TAG_LAUNCHED_AT})")
    reason = past_a_limit(hours, cost, max_hours, max_cost, usd_per_hour, grace_minutes)
    return decision(reason is not None, reason or "within its limits")


def reap(client: LambdaClient, live_stacks: set[str], *, dry_run: bool, now: datetime,
         grace_minutes: float) -> list[ReapDecision]:
    decisions = [decide(instance, live_stacks, now, grace_minutes) for instance in client.list_instances()
                 if is_managed(instance) and instance["status"] not in GONE_STATUSES]
    if not dry_run:
        for decision in decisions:
            if decision.terminate:
                client.terminate_if_present(decision.resource_id)
    return decisions
