"""`make reap` (`python -m infra.reaper`): terminate lorastack pods past their limits or without a live stack.

The trainer stops its own pod on every way out; this catches what it cannot: a trainer that could not reach
the API, a hung host, a pod whose stack was deleted without `pulumi destroy`. Runs from a laptop or on a
schedule (.github/workflows), with RUNPOD_API_KEY.

A pod is ours when its name starts with `lorastack-` and its env has LORASTACK_MANAGED=1; other pods are
never touched. One of ours is terminated when
- its stack is not live: not among `--stacks` (CI passes the stacks that have Pulumi state, e.g. from
  `pulumi stack ls --json`), or, without `--stacks`, its stack file stacks/Pulumi.<stack>.yaml is gone;
- it is running (or in ERROR, which RunPod bills too) past its limits (LORASTACK_LIMITS in its env) by more
  than `--grace-minutes`: hours since the API's startedAt (createdAt when absent) over maxHours, or those hours at the pod's price over maxCostUsd;
- it is running with no readable limits (every lorastack pod must carry them).
A stopped pod of a live stack is left alone: it bills no GPU, and it is in its stack's state.
`--dry-run` lists the decisions and terminates nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TextIO

from pydantic import ValidationError

from infra.credentials import SECRETS, use_stack_credentials
from infra.stack_files import STACKS_DIR
from cloudapi.runpod_rest import RunpodClient, RunpodError
from contract.spec import ENV_LIMITS, ENV_MANAGED, ENV_STACK, RunLimits

POD_PREFIX = "lorastack-"
LIVE_STATUSES = ("PROVISIONING", "STARTING", "RUNNING")
# What RunPod bills: a pod's cost is 0.0 only when EXITED or TERMINATED. An ERROR pod is billed, and no trainer
# runs in it to stop it: the limits hold for it as for a running one.
BILLED_STATUSES = (*LIVE_STATUSES, "ERROR")
DEFAULT_GRACE_MINUTES = 10.0  # the trainer's own stop (checkpoint, upload) gets this long past a limit


@dataclass
class Decision:
    pod_id: str
    stack: str
    status: str
    hours: float | None
    cost_usd: float | None
    terminate: bool
    reason: str


def is_managed(pod: dict) -> bool:
    return str(pod.get("name", "")).startswith(POD_PREFIX) and (pod.get("env") or {}).get(ENV_MANAGED) == "1"


def stack_of(pod: dict) -> str:
    return (pod.get("env") or {}).get(ENV_STACK) or pod["name"][len(POD_PREFIX):]


def stacks_with_files() -> set[str]:
    return {path.name.removeprefix("Pulumi.").removesuffix(".yaml") for path in STACKS_DIR.glob("Pulumi.*.yaml")}


def _hours_running(pod: dict, now: datetime) -> float | None:
    started = pod.get("startedAt") or pod.get("createdAt")
    if not started:
        return None
    begun = datetime.fromisoformat(started.replace("Z", "+00:00"))
    return max((now - begun).total_seconds() / 3600, 0.0)


def decide(pod: dict, live_stacks: set[str], now: datetime, grace_minutes: float = DEFAULT_GRACE_MINUTES) -> Decision:
    stack, status = stack_of(pod), pod.get("status", "?")
    running = status in BILLED_STATUSES
    hours = _hours_running(pod, now) if running else None
    usd_per_hour = float(pod.get("cost") or 0.0)
    cost = hours * usd_per_hour if hours is not None else None

    def decision(terminate: bool, reason: str) -> Decision:
        return Decision(pod["id"], stack, status, hours, cost, terminate, reason)

    if stack not in live_stacks:
        return decision(True, f"no live stack {stack!r}")
    if not running:
        return decision(False, "stopped (bills no GPU; in its stack's state)")
    try:
        limits = RunLimits.model_validate_json((pod.get("env") or {}).get(ENV_LIMITS) or "")
    except ValidationError:
        return decision(True, f"running without readable limits ({ENV_LIMITS})")
    grace = grace_minutes / 60
    if hours is not None and hours > limits.max_hours + grace:
        return decision(True, f"running {hours:.2f} h, past maxHours {limits.max_hours:g} (+{grace_minutes:g} min grace)")
    if cost is not None and cost > limits.max_cost_usd + grace * usd_per_hour:
        return decision(True, f"${cost:.2f} spent, past maxCostUsd {limits.max_cost_usd:g} (+{grace_minutes:g} min grace)")
    return decision(False, "within its limits")


def reap(client: RunpodClient, live_stacks: set[str], *, dry_run: bool = False, now: datetime | None = None,
         grace_minutes: float = DEFAULT_GRACE_MINUTES) -> list[Decision]:
    now = now or datetime.now(timezone.utc)
    decisions = [decide(pod, live_stacks, now, grace_minutes) for pod in client.list_pods() if is_managed(pod)]
    if not dry_run:
        for decision in decisions:
            if decision.terminate:
                client.terminate_pod(decision.pod_id)
    return decisions


def render(decisions: Iterable[Decision], dry_run: bool) -> str:
    rows = [("pod", "stack", "status", "hours", "cost", "action", "why")]
    for d in decisions:
        action = ("would terminate" if dry_run else "terminated") if d.terminate else "keep"
        rows.append((d.pod_id, d.stack, d.status, "-" if d.hours is None else f"{d.hours:.2f}",
                     "-" if d.cost_usd is None else f"${d.cost_usd:.2f}", action, d.reason))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.reaper", description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", help="comma-separated live stacks (default: those with a file in stacks/)")
    parser.add_argument("--grace-minutes", type=float, default=DEFAULT_GRACE_MINUTES)
    parser.add_argument("--dry-run", action="store_true", help="list the decisions, terminate nothing")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    use_stack_credentials("reap", sorted(stacks_with_files()))  # a stack's secret config, else the environment
    api_key = os.environ.get(SECRETS["runpodApiKey"])
    if not api_key:
        print("RUNPOD_API_KEY is not set: export it (RunPod console > Settings > API Keys)", file=sys.stderr)
        return 2
    live = {name.strip() for name in args.stacks.split(",") if name.strip()} if args.stacks is not None else stacks_with_files()
    try:
        decisions = reap(RunpodClient(api_key), live, dry_run=args.dry_run, grace_minutes=args.grace_minutes)
    except RunpodError as error:
        print(f"{error} (check RUNPOD_API_KEY, and RUNPOD_API_BASE_URL if set)", file=sys.stderr)
        return 2
    if not decisions:
        print("no lorastack pods", file=out)
        return 0
    print(render(decisions, args.dry_run), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
