"""`up`, `preview`, `refresh` and `destroy` of a stack without the Pulumi CLI, through emulator/language_host.py.

The program runs as Pulumi's Python language host runs it (a subprocess in Pulumi.yaml's `main`, started with
`runpy.run_path(".")`, the stack's config in PULUMI_CONFIG as the CLI passes it), and every dynamic provider
runs in the SDK's own provider host (`python -m pulumi.dynamic`) from the bytes the program pickled. The state
is a JSON file per stack (`<state_dir>/<stack>.json`) with its secrets encrypted. Every operation is counted
(`Operations`), so a test can assert that a second `up` with no change creates, updates and replaces nothing.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from emulator.language_host import (
    Deployment,
    Operations,
    ProgramError,
    Project,
    ProviderHost,
    StackState,
    cli_config,
    run_program,
)
from infra.config import NAMESPACE
from infra.stack_files import stack_file

__all__ = ["Operations", "ProgramError", "StackDriver"]


class StackDriver:
    """One stack's `up()`, `preview()`, `refresh()` and `destroy()`; state in `<state_dir>/<stack>.json`."""

    def __init__(self, stack: str, state_dir: Path, secrets: dict[str, str] | None = None,
                 overrides: dict[str, Any] | None = None, log: logging.Logger | None = None,
                 project: Project | None = None):
        """`secrets`: config secrets by name (runpodApiKey, hfToken, ...); `overrides`: `lorastack:<key>` values
        replacing the stack file's."""
        self.stack = stack
        self.state_path = Path(state_dir) / f"{stack}.json"
        self.secrets = dict(secrets or {})
        self.overrides = dict(overrides or {})
        self.log = log or _printing_logger()
        self.project = project or Project.load()

    def config(self) -> dict[str, Any]:
        document = yaml.safe_load(stack_file(self.stack).read_text()) or {}
        config = dict(document.get("config") or {})
        config.update(self.overrides)
        return config

    def _cli_config(self) -> tuple[dict[str, str], list[str]]:
        secrets = {f"{NAMESPACE}:{name}": value for name, value in self.secrets.items()}
        return cli_config(self.config(), secrets, str(stack_file(self.stack)))

    def _deployment(self, dry_run: bool) -> tuple[Deployment, Operations]:
        config, secret_keys = self._cli_config()
        operations = Operations()
        deployment = Deployment(StackState(self.state_path), lambda: ProviderHost(self.project.main, config, secret_keys),
                                dry_run, operations)
        return deployment, operations

    def _run(self, dry_run: bool) -> tuple[dict, Operations]:
        config, secret_keys = self._cli_config()
        deployment, operations = self._deployment(dry_run)
        try:
            outputs = run_program(self.project, self.stack, config, secret_keys, deployment, {}, dry_run, self.log)
            if not dry_run:
                deployment.delete_unregistered()  # as `pulumi up`: what the program no longer declares goes
        finally:
            deployment.close()
        return outputs, operations

    def up(self) -> tuple[dict, Operations]:
        """`pulumi up`: returns the stack outputs (secrets revealed, for the caller only) and what was done."""
        return self._run(dry_run=False)

    def preview(self) -> tuple[dict, Operations]:
        """`pulumi preview`: what `up` would do; nothing is changed, nothing is written. An output known only
        after `up` (a new pod's id) is Pulumi's unknown marker, `pulumi.runtime.rpc.UNKNOWN`."""
        return self._run(dry_run=True)

    def refresh(self) -> Operations:
        """`pulumi refresh`: read every resource back; one gone outside Pulumi leaves the state."""
        deployment, operations = self._deployment(dry_run=False)
        try:
            deployment.refresh()
        finally:
            deployment.close()
        return operations

    def destroy(self) -> Operations:
        """`pulumi destroy`: every resource, the newest first; a retained one (retainOnDelete) is only forgotten."""
        deployment, operations = self._deployment(dry_run=False)
        try:
            for resource in reversed(list(deployment.state.resources.values())):
                deployment.delete(resource)  # saved after each: a failure part-way leaves the rest in the state
            with deployment.state.lock:
                deployment.state.outputs = {}
                deployment.state.save()
        finally:
            deployment.close()
        return operations


def _printing_logger() -> logging.Logger:
    logger = logging.getLogger("lorastack.stack_driver")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("  %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
