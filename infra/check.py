"""`make check [STACK=name]`: validate stack files offline, no Pulumi CLI, no credentials.

Prints every problem in every stack at once and exits non-zero if there is any; CI and pre-commit run it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from infra.stack_files import STACKS_DIR, StackError, load_stack_file, stack_file


def main(argv: list[str]) -> int:
    # a stack name (sdxl-4090) or a path to a stack file
    paths = [Path(arg) if arg.endswith(".yaml") else stack_file(arg) for arg in argv]
    paths = paths or sorted(STACKS_DIR.glob("Pulumi.*.yaml"))
    failures = 0
    for path in paths:
        try:
            config = load_stack_file(path)
        except StackError as error:
            failures += 1
            print(f"FAIL {path.name}", file=sys.stderr)
            for line in error.problems:
                print(f"  {line}", file=sys.stderr)
            continue
        estimate = config.cost_estimate()
        print(
            f"ok   {path.name}: {config.provider} {config.train.family} {config.train.steps} steps, "
            f"~{estimate.hours:.1f} h, ~${estimate.usd:.2f} (limit ${config.limits.max_cost_usd:g}, {config.limits.max_hours:g} h)"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
