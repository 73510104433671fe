"""Running the Pulumi program as Pulumi's language host runs it, with made-up resources from a `pulumi.runtime.Mocks`.

The program is a subprocess in infra/ started with `runpy.run_path(".")` and the stack's config passed as the
CLI passes it (emulator/language_host.py); only the ids and outputs of its resources come from `mocks`. What it
asks the engine for (type, inputs, retainOnDelete, deleteBeforeReplace, additionalSecretOutputs) is recorded,
so tests assert what `pulumi up` would do.
"""

from __future__ import annotations

import logging
from typing import Any

import pulumi

from emulator.language_host import MockedResources, Operations, ProgramRun, Project, cli_config, run_program


def run_mocked(
    mocks: pulumi.runtime.Mocks,
    stack: str,
    config: dict[str, Any],
    secrets: dict[str, str] | None = None,
    preview: bool = False,
) -> ProgramRun:
    """Run stack `stack`'s program with `config` (`lorastack:*` values as the stack file holds them) and
    `secrets` (config secrets by name, e.g. runpodApiKey); raises language_host.ProgramError when it fails."""
    values, secret_keys = cli_config(
        config, {f"lorastack:{name}": value for name, value in (secrets or {}).items()}, f"Pulumi.{stack}.yaml"
    )
    operations, registrations = Operations(), {}
    outputs = run_program(Project.load(), stack, values, secret_keys, MockedResources(mocks, operations),
                          registrations, preview, logging.getLogger("tests.program"))
    return ProgramRun(outputs, registrations, operations)
