"""`make reap` (`python -m infra.reaper`): terminate lorastack resources past their limits or without a live stack.

The trainer stops its own machine on every way out; this catches what it cannot: a trainer that could not reach
the API, a hung host, a machine whose stack was deleted without `pulumi destroy`. Runs from a laptop or on a
schedule (.github/workflows), with each backend's credential (RUNPOD_API_KEY for RunPod).

Every backend says what of ours it finds billing and what to do with it (`Backend.reap`; RunPod's rules are in
infra/runpod_backend/reap.py). A stack is live when it is among `--stacks` (CI passes the stacks that have Pulumi
state, e.g. from `pulumi stack ls --json`), or, without `--stacks`, when its file stacks/Pulumi.<stack>.yaml
exists. `--dry-run` lists the decisions and terminates nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping
from typing import TextIO

from infra import backends
from infra.backends import OpsError, ReapDecision
from infra.credentials import use_stack_credentials
from infra.paths import STACKS_DIR
from infra.table import render_table

DEFAULT_GRACE_MINUTES = 10.0  # the trainer's own stop (checkpoint, upload) gets this long past a limit


def stacks_with_files() -> set[str]:
    return {path.name.removeprefix("Pulumi.").removesuffix(".yaml") for path in STACKS_DIR.glob("Pulumi.*.yaml")}


def reap(live_stacks: set[str], environ: Mapping[str, str], *, dry_run: bool = False,
         grace_minutes: float = DEFAULT_GRACE_MINUTES) -> list[ReapDecision]:
    """Every backend's decisions (its billed resources terminated unless `dry_run`)."""
    return [decision for name in backends.names()
            for decision in backends.get(name).reap(live_stacks, environ, dry_run=dry_run, grace_minutes=grace_minutes)]


def render(decisions: Iterable[ReapDecision], dry_run: bool) -> str:
    rows = []
    for d in decisions:
        action = ("would terminate" if dry_run else "terminated") if d.terminate else "keep"
        rows.append((d.resource_id, d.stack, d.status, "-" if d.hours is None else f"{d.hours:.2f}",
                     "-" if d.cost_usd is None else f"${d.cost_usd:.2f}", action, d.reason))
    return render_table(("pod", "stack", "status", "hours", "cost", "action", "why"), rows, rule=False)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.reaper", description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", help="comma-separated live stacks (default: those with a file in stacks/)")
    parser.add_argument("--grace-minutes", type=float, default=DEFAULT_GRACE_MINUTES)
    parser.add_argument("--dry-run", action="store_true", help="list the decisions, terminate nothing")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    live = {name.strip() for name in args.stacks.split(",") if name.strip()} if args.stacks is not None else stacks_with_files()
    # every backend's credentials, from a stack's secret config, else the environment; a backend whose credential
    # is nowhere says so and is skipped (a RunPod-only user has no Vast.ai key)
    wanted = [name for backend in map(backends.get, backends.names())
              for name in (*backend.ops_secrets, *backend.ops_optional_secrets)]
    use_stack_credentials((), wanted, sorted(stacks_with_files()))
    try:
        decisions = reap(live, os.environ, dry_run=args.dry_run, grace_minutes=args.grace_minutes)
    except OpsError as error:
        print(error, file=sys.stderr)
        return 2
    if not decisions:
        print("no lorastack pods", file=out)
        return 0
    print(render(decisions, args.dry_run), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
