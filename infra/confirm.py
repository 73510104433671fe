"""`make train` / `make destroy` (`python -m infra.confirm up|destroy STACK`): show the change, then ask, like `pulumi up`.

The change comes from the Pulumi CLI itself (`pulumi preview --json` for up, `pulumi destroy --preview-only --json`
for destroy) and is printed one resource a line. What costs work is called out before the question: a pod that is
replaced (the running one is deleted first; training resumes on the new pod from the last checkpoint) and a network
volume that is deleted (its datasets, model cache and checkpoints with it). Then it asks y/N on a terminal, and on
yes runs `pulumi up --yes --skip-preview` / `pulumi destroy --yes`. `--yes` (the Makefile's YES=1) or CI=true skips
the question; without a terminal to ask on and without either, nothing is changed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from infra.credentials import PULUMI_ENV

PROJECT_DIR = Path(__file__).resolve().parent.parent
CHANGING_OPS = ("create", "update", "replace", "delete", "create-replacement", "delete-replaced", "import")
SYMBOLS = {"create": "+", "update": "~", "replace": "+-", "delete": "-", "create-replacement": "++",
           "delete-replaced": "--", "import": "="}
# pulumi.dynamic.Resource types its subclasses `pulumi-python:dynamic/<module>:<name>` (infra/runpod_backend)
POD_TYPE = "pulumi-python:dynamic/runpod:Pod"
VOLUME_TYPE = "pulumi-python:dynamic/runpod:NetworkVolume"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Pulumi colours diagnostics even with --color never


@dataclass(frozen=True)
class Step:
    op: str
    type: str  # pulumi-python:dynamic/runpod:Pod, lorastack:runpod:Training, ...
    name: str
    reasons: tuple[str, ...] = ()  # the keys that cause it (replaceReasons, else diffReasons)
    retained: bool = False  # retain_on_delete: a delete that forgets the resource and leaves it in the cloud
    kept_by_provider: bool = False  # keepOnDestroy: true, recorded in the resource's inputs


def parse_steps(output: str) -> list[Step]:
    """Steps from either JSON shape the CLI prints: one preview document (`{"steps": [...]}`, `pulumi preview --json`)
    or a stream of engine events, one a line (`{"resourcePreEvent": {"metadata": {...}}}`, the other commands)."""
    text = output.strip()
    if not text:
        return []
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    if isinstance(document, dict) and "steps" in document:
        return [_step(raw.get("op", ""), raw.get("urn", ""), raw.get("replaceReasons") or raw.get("diffReasons") or (),
                      raw.get("oldState") or {}) for raw in document.get("steps") or []]
    steps = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        metadata = (event.get("resourcePreEvent") or {}).get("metadata") if isinstance(event, dict) else None
        if metadata:
            steps.append(_step(metadata.get("op", ""), metadata.get("urn", ""),
                               metadata.get("keys") or metadata.get("diffs") or (), metadata.get("old") or {}))
    return steps


def _step(op: str, urn: str, reasons, old_state: Mapping) -> Step:
    # urn:pulumi:<stack>::<project>::<parent types$>type::name
    parts = urn.split("::")
    type_ = parts[2].rsplit("$", 1)[-1] if len(parts) > 3 else ""
    name = parts[-1] if len(parts) > 3 else urn
    inputs = old_state.get("inputs") or {}
    return Step(op, type_, name, tuple(str(reason) for reason in reasons), bool(old_state.get("retainOnDelete")),
                inputs.get("keepOnDestroy") is True)


def warnings(steps: list[Step]) -> list[str]:
    """The changes that cost work, in words."""
    found = []
    for step in steps:
        why = f" ({', '.join(step.reasons)} changed)" if step.reasons else ""
        if step.type == POD_TYPE and step.op in ("replace", "delete-replaced"):
            found.append(f"the pod {step.name} will be REPLACED{why}: the running pod is deleted first and its "
                         "training stops; the new pod resumes from the newest checkpoint on the volume")
        volume_goes = step.op in ("replace", "delete", "delete-replaced") and not (step.retained or step.kept_by_provider)
        if step.type == VOLUME_TYPE and volume_goes:
            found.append(f"the network volume {step.name} will be DELETED{why}: its checkpoints, datasets and model "
                         "cache go with it (keepOnDestroy: true keeps a volume)")
    return found


def render(steps: list[Step]) -> str:
    lines = []
    for step in steps:
        if step.op not in CHANGING_OPS:
            continue
        why = f"  [{', '.join(step.reasons)}]" if step.reasons and step.op in ("update", "replace") else ""
        forgotten = step.op == "delete" and (step.retained or step.kept_by_provider)
        kept = "  (retained: forgotten, not deleted)" if forgotten else ""
        lines.append(f"  {SYMBOLS.get(step.op, '?'):<2} {step.op:<8} {step.type} {step.name}{why}{kept}")
    return "\n".join(lines)


def preview_command(pulumi: str, action: str, stack: str) -> list[str]:
    if action == "up":
        return [pulumi, "preview", "--stack", stack, "--json", "--diff"]
    return [pulumi, "destroy", "--stack", stack, "--preview-only", "--json"]


def apply_command(pulumi: str, action: str, stack: str) -> list[str]:
    if action == "up":
        return [pulumi, "up", "--stack", stack, "--yes", "--skip-preview"]
    return [pulumi, "destroy", "--stack", stack, "--yes"]


def ask(question: str, stdin: TextIO, out: TextIO) -> bool:
    print(question, end="", file=out, flush=True)
    answer = stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def run(action: str, stack: str, assume_yes: bool, environ: Mapping[str, str], stdin: TextIO, out: TextIO) -> int:
    pulumi = environ.get(PULUMI_ENV) or "pulumi"
    verb = "update" if action == "up" else "destroy"
    print(f"previewing the {verb} of {stack} ...", file=out, flush=True)
    preview = subprocess.run(preview_command(pulumi, action, stack), cwd=PROJECT_DIR, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL)
    steps = parse_steps(preview.stdout) if preview.returncode == 0 else []
    if preview.returncode != 0:
        print(_ANSI.sub("", preview.stderr.strip() or _diagnostics(preview.stdout)), file=out)
        print(f"the preview failed (exit status {preview.returncode}): nothing was changed", file=out)
        return preview.returncode
    changes = [step for step in steps if step.op in CHANGING_OPS]
    if not changes:
        print(f"{stack}: no changes; nothing to do", file=out)
        return 0
    print(render(steps), file=out)
    for warning in warnings(steps):
        print(f"WARNING: {warning}", file=out)
    if assume_yes:
        print(f"going ahead without asking ({'YES=1' if not _ci(environ) else 'CI=true'})", file=out)
    elif not stdin.isatty():
        target = "train" if action == "up" else "destroy"
        print(f"no terminal to ask on: nothing was changed; run again with YES=1 (make {target} STACK={stack} YES=1) "
              "to go ahead without the question", file=out)
        return 2
    elif not ask(f"Do you want to perform this {verb}? [y/N] ", stdin, out):
        print("nothing was changed", file=out)
        return 1
    out.flush()
    return subprocess.run(apply_command(pulumi, action, stack), cwd=PROJECT_DIR).returncode


def _diagnostics(stdout: str) -> str:
    try:
        document = json.loads(stdout)
    except json.JSONDecodeError:
        return stdout.strip()
    return "\n".join(str(item.get("message", "")).strip() for item in document.get("diagnostics") or [])


def _ci(environ: Mapping[str, str]) -> bool:
    return environ.get("CI", "").lower() in ("1", "true", "yes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.confirm", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "destroy"))
    parser.add_argument("stack", help="the stack name (stacks/Pulumi.<name>.yaml)")
    parser.add_argument("--yes", action="store_true", help="do not ask (also when the environment has CI=true)")
    args = parser.parse_args(argv)
    return run(args.action, args.stack, args.yes or _ci(os.environ), os.environ, sys.stdin, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
