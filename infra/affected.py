"""`python -m infra.affected --base REF`: the stacks a change touches, for CI to preview or update.

A changed `stacks/Pulumi.<name>.yaml` affects that stack. A change to the code every stack runs (the
Pulumi program, the trainer, the image, the policy pack, the project and dependency files) affects all
of them. Stacks whose file was deleted are not previewed or updated (there is no config left to run):
they are named on stderr, because their resources still exist until someone runs `make destroy`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from infra.paths import REPO_ROOT

# Changes under these affect every stack: the program, what it shares with the trainer (contract, vendor clients),
# the trainer in the image, the run report, the image, the policies.
SHARED_PREFIXES = ("infra/", "contract/", "cloudapi/", "training/", "report/", "container/", "policy/")
# Single files with the same reach: the Pulumi project file and the pinned dependencies.
SHARED_FILES = ("Pulumi.yaml", "pyproject.toml")
_STACK_FILE = re.compile(r"^stacks/Pulumi\.([^/]+)\.yaml$")
# Stacks that only ever run against the local emulator (`make demo`): CI has no cloud for them to preview.
LOCAL_ONLY_STACKS = frozenset({"demo"})


@dataclass(frozen=True)
class AffectedStacks:
    stacks: list[str]  # to preview / update, sorted
    deleted: list[str]  # stack files removed by the change
    reason: str  # one line for the CI log


def stacks_in(root: Path) -> list[str]:
    names = (path.name.removeprefix("Pulumi.").removesuffix(".yaml") for path in (root / "stacks").glob("Pulumi.*.yaml"))
    return sorted(name for name in names if name not in LOCAL_ONLY_STACKS)


def affected_by(changed_paths: list[str], existing_stacks: list[str]) -> AffectedStacks:
    """Pure rule: which of `existing_stacks` the changed paths (relative to the repository root) affect."""
    shared = sorted(path for path in changed_paths if path.startswith(SHARED_PREFIXES) or path in SHARED_FILES)
    named = {match.group(1) for path in changed_paths if (match := _STACK_FILE.match(path))}
    deleted = sorted(name for name in named if name not in existing_stacks and name not in LOCAL_ONLY_STACKS)
    if shared:
        more = f" and {len(shared) - 1} more" if len(shared) > 1 else ""
        return AffectedStacks(list(existing_stacks), deleted, f"all stacks: {shared[0]}{more} changed")
    stacks = sorted(name for name in named if name in existing_stacks)
    reason = f"stack files changed: {', '.join(stacks)}" if stacks else "no stack is affected"
    return AffectedStacks(stacks, deleted, reason)


def changed_paths(base: str, head: str, root: Path) -> list[str]:
    """Paths changed between the merge base of `base` and `head`, and `head` (what a pull request shows)."""
    result = subprocess.run(
        ["git", "diff", "--name-only", "--no-renames", f"{base}...{head}"],
        cwd=root, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"git diff {base}...{head} failed: {result.stderr.strip()} "
            "(in CI, check out with fetch-depth: 0 so the base commit is there)"
        )
    return [line for line in result.stdout.splitlines() if line]


def _is_null_commit(ref: str) -> bool:
    # GitHub sends 40 zeros as `before` for the first push of a branch: nothing to diff against.
    return bool(re.fullmatch(r"0{40}", ref))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.affected", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the ref to compare with, e.g. origin/main or a commit")
    parser.add_argument("--head", default="HEAD", help="the ref with the change (default: HEAD)")
    parser.add_argument("--json", action="store_true", help="print a JSON list (for a GitHub Actions matrix)")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    existing = stacks_in(args.root)
    if _is_null_commit(args.base):
        result = AffectedStacks(existing, [], f"all stacks: no base commit to compare with ({args.base[:7]}...)")
    else:
        try:
            paths = changed_paths(args.base, args.head, args.root)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 2
        result = affected_by(paths, existing)

    print(result.reason, file=sys.stderr)
    for name in result.deleted:
        print(
            f"stacks/Pulumi.{name}.yaml was deleted: CI does not destroy the stack; its pod and volume stay "
            f"until someone restores the file and runs `make destroy STACK={name}`",
            file=sys.stderr,
        )
    print(json.dumps(result.stacks) if args.json else "\n".join(result.stacks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
