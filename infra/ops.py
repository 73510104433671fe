"""`make status|logs|fetch STACK=name` (`python -m infra.ops status|logs|fetch STACK`): follow a run, get its LoRA.

The command line only: each command asks the stack's backend (infra.backends) and prints what it answers.
`status` shows state, step, loss, ETA and cost so far; `logs` follows the run's log until it ends; `fetch`
downloads the LoRA into outputs/<stack>/: from the Hugging Face Hub when train.hfRepo is set (any backend),
else from where the backend keeps it (RunPod: the volume mounted here, or its S3 API), and when that is not
possible it prints the steps that reach the files. A problem a person can act on is one message, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import TextIO

from infra import paths
from infra.backends import OpsError, Report
from infra.config import StackConfig
from infra.credentials import FETCH_OPTIONAL_SECRETS, use_stack_credentials
from infra.hub import fetch_from_hub
from infra.stack_files import StackError, load_stack


def command_status(stack: str, config: StackConfig, out: TextIO, environ: Mapping[str, str]) -> Report:
    return config.backend.status(stack, config, environ)


def command_logs(stack: str, config: StackConfig, out: TextIO, environ: Mapping[str, str]) -> Report:
    try:
        return config.backend.logs(stack, config, environ, lambda line: print(line, file=out, flush=True))
    except KeyboardInterrupt:
        return Report([""])  # end the line ^C left; leaving is what was asked for, not an error


def command_fetch(stack: str, config: StackConfig, out: TextIO, environ: Mapping[str, str]) -> Report:
    destination = paths.OUTPUTS_DIR / stack
    if config.train.hf_repo:
        fetch_from_hub(config.train.hf_repo, destination, environ)
        return Report([f"{stack}: LoRA from https://huggingface.co/{config.train.hf_repo} in {destination}"])
    return config.backend.fetch(stack, config, destination, environ)


COMMANDS = {"status": command_status, "logs": command_logs, "fetch": command_fetch}


def run_command(command: str, stack: str, config: StackConfig, out: TextIO,
                environ: Mapping[str, str] | None = None) -> int:
    """One command on a loaded stack: its lines to `out`, a problem to stderr; the exit status."""
    try:
        report = COMMANDS[command](stack, config, out, os.environ if environ is None else environ)
    except OpsError as error:
        print(error, file=sys.stderr)
        return 2
    for line in report.lines:
        print(line, file=out)
    return report.code


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.ops", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("stack", nargs="?", help="the stack name (stacks/Pulumi.<name>.yaml)")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    if not args.stack:
        print(f"name a stack: make {args.command} STACK=sdxl-4090 (files in stacks/)", file=sys.stderr)
        return 2
    try:
        config = load_stack(args.stack)
    except StackError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 2
    backend = config.backend
    optional = backend.ops_optional_secrets + (FETCH_OPTIONAL_SECRETS if args.command == "fetch" else ())
    use_stack_credentials(backend.ops_secrets, optional, [args.stack])  # the stack's secret config, else the environment
    return run_command(args.command, args.stack, config, out)


if __name__ == "__main__":
    sys.exit(main())
