"""`make check [STACK=name]`: validate stack files offline, no Pulumi CLI, no credentials.

    python -m infra.check [STACK-or-path ...]      (default: every stacks/Pulumi.*.yaml)

Prints every problem in every stack in one pass and exits 1 if there is any. A malformed file is one
error for that file, and the other stacks are still checked. CI (.github/workflows/preview.yml) runs it, and so
does the pre-commit hook (.pre-commit-config.yaml) when a commit changes a stack file or the schema.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infra.stack_files import STACKS_DIR, StackError, load_stack_file, stack_file


def check_file(path: Path) -> list[str]:
    """The problems of one stack file (none: it is valid), after printing its verdict."""
    try:
        config = load_stack_file(path)
        estimate = config.cost_estimate()
    except StackError as error:
        problems = error.problems
    except Exception as error:  # one broken file must not stop the check of the others
        problems = [f"{path}: could not be checked ({type(error).__name__}: {error}); this is a lorastack bug, "
                    "please report it with the file"]
    else:
        print(
            f"ok   {path.name}: {config.provider} {config.train.family} {config.train.steps} steps, "
            f"~{estimate.hours:.1f} h, ~${estimate.usd:.2f} "
            f"(limit ${config.limits.max_cost_usd:g}, {config.limits.max_hours:g} h)"
        )
        return []
    print(f"FAIL {path.name}", file=sys.stderr)
    for line in problems:
        print(f"  {line}", file=sys.stderr)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.check", description=__doc__.splitlines()[0])
    parser.add_argument("stacks", nargs="*", metavar="STACK",
                        help="stack names (sdxl-4090) or paths to stack files; default: every stack in stacks/")
    args = parser.parse_args(argv)
    paths = [Path(arg) if arg.endswith((".yaml", ".yml")) else stack_file(arg) for arg in args.stacks]
    paths = paths or sorted(STACKS_DIR.glob("Pulumi.*.yaml"))
    failures = sum(1 for path in paths if check_file(path))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
