"""The cloud backends: `lorastack:provider` names one, and this registry finds its package.

A backend is one package, `infra/<name>_backend/`, whose `backend.py` holds `BACKEND`, an object with the
`Backend` interface below: its stack-file section, its prices, the Pulumi component it builds, and the hooks
`make status|logs|fetch|reap|cost` call; its `policies.py` holds its policy-pack policies (POLICIES). Nothing
outside a backend package branches on the provider's name: the program, the CLI, the reaper and the cost table
ask the registry. A backend's module is imported when it is first asked for, so a RunPod stack never loads
Replicate's SDK and `make check` loads no Pulumi at all.

Adding a backend: its package (config.py, catalog.py, backend.py, policies.py, the providers and the component), an emulator
of its API under emulator/, and one line in BACKEND_MODULES.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    import pulumi

    from infra.config import StackConfig

# provider name (`lorastack:provider`, also the name of its section `lorastack:<name>`) -> the module holding BACKEND
BACKEND_MODULES: dict[str, str] = {
    "runpod": "infra.runpod_backend.backend",
    "replicate": "infra.replicate_backend.backend",
    "local": "infra.local_backend.backend",
    "lambda": "infra.lambda_backend.backend",
    "hfjobs": "infra.hfjobs_backend.backend",
    "vast": "infra.vast_backend.backend",
}
if TYPE_CHECKING:
    ProviderName = str  # a Literal built at runtime from a tuple is not a static type: mypy reads it as str
else:
    ProviderName = Literal[tuple(BACKEND_MODULES)]  # the schema's `provider` values


class OpsError(Exception):
    """A problem a person can act on (a missing credential, nothing to fetch yet): one message, exit status 2."""


@dataclass
class Report:
    """What an ops hook has to say: the lines for stdout and the command's exit status."""

    lines: list[str]
    code: int = 0


@dataclass
class ReapDecision:
    """What the reaper does with one billed thing of ours, and why."""

    resource_id: str
    stack: str
    status: str
    hours: float | None
    cost_usd: float | None
    terminate: bool
    reason: str


def past_a_limit(hours: float | None, cost: float | None, max_hours: float, max_cost_usd: float,
                 usd_per_hour: float, grace_minutes: float) -> str | None:
    """Why a billed machine is past its time or money limit, each with `grace_minutes` more for the trainer's own
    stop (checkpoint, upload); None when it is within both (or a figure is unknown)."""
    grace = grace_minutes / 60
    if hours is not None and hours > max_hours + grace:
        return f"running {hours:.2f} h, past maxHours {max_hours:g} (+{grace_minutes:g} min grace)"
    if cost is not None and cost > max_cost_usd + grace * usd_per_hour:
        return f"${cost:.2f} spent, past maxCostUsd {max_cost_usd:g} (+{grace_minutes:g} min grace)"
    return None


@dataclass(frozen=True)
class LivePrices:
    """A backend's prices as its API gives them now (`data`, None when not fetched) and where they came from."""

    data: Any
    note: str


class Backend(Protocol):
    name: str  # the provider name; its stack-file section is `lorastack:<name>`
    section: type[BaseModel]  # the model of that section
    # The secret config keys (infra.credentials.SECRETS) its status/logs/fetch/reap hooks read: `ops_secrets` are
    # needed (the CLI says where each came from, or that it is not set), `ops_optional_secrets` used when set.
    ops_secrets: tuple[str, ...]
    ops_optional_secrets: tuple[str, ...]

    # --- the schema ---
    def check(self, config: StackConfig) -> None:
        """Cross-section rules of this backend (ValueError with the message for the stack file)."""

    def gpu_memory(self, config: StackConfig) -> tuple[str, float] | None:
        """(the key and value that name the GPU, its memory in GB) for the memory fit rule; None when the trainer
        that runs is not ours (its memory is not ours to model)."""

    # --- prices ---
    def usd_per_hour(self, config: StackConfig, live: Any = None) -> tuple[float, str]:
        """What a run is billed per hour, and the source of that price (the dated table, or `live` data)."""

    def performance_gpu(self, config: StackConfig) -> tuple[str, int]:
        """The GPU (by CUDA's name) and how many, for the seconds-per-step model."""

    def hardware(self, config: StackConfig) -> str:
        """The hardware as the cost table shows it."""

    def cost_notes(self, stack: str, config: StackConfig) -> list[str]:
        """Costs beside the run's (storage kept between runs), one line each."""

    def live_prices(self, environ: Mapping[str, str], timeout: float) -> LivePrices:
        """Today's prices from the API when a credential is set and it answers in time; the reason when not."""

    def live_warnings(self, config: StackConfig, live: Any) -> list[str]:
        """What the live data says is wrong with the stack (hardware no longer offered)."""

    # --- Pulumi ---
    def build(self, stack: str, config: StackConfig, secrets: Mapping[str, Any],
              image_ref: Callable[[], pulumi.Input[str]]) -> dict[str, Any]:
        """Declare the stack's resources (its component); returns the stack outputs. `image_ref()` gives the trainer
        image for backends that run ours."""

    # --- make status | logs | fetch | reap ---
    def status(self, stack: str, config: StackConfig, environ: Mapping[str, str]) -> Report: ...

    def logs(self, stack: str, config: StackConfig, environ: Mapping[str, str], emit: Callable[[str], None]) -> Report:
        """Emit the run's log as it comes, until the run has ended."""

    def fetch(self, stack: str, config: StackConfig, destination, environ: Mapping[str, str]) -> Report:
        """Download the LoRA into `destination` (the Hugging Face Hub case is handled before, for every backend)."""

    def reap(self, live_stacks: set[str], environ: Mapping[str, str], *, dry_run: bool,
             grace_minutes: float) -> list[ReapDecision]:
        """Our billed resources outside a live stack or past their limits; terminated unless `dry_run`."""


class RunsOurTrainer:
    """`build` for a backend whose component runs our trainer image: `component` names the ComponentResource and its
    args dataclass (`module:Class:ArgsClass`), imported only when the program builds (pulumi loads there alone)."""

    component: ClassVar[str]

    def build(self, stack: str, config: StackConfig, secrets: Mapping[str, Any],
              image_ref: Callable[[], pulumi.Input[str]]) -> dict[str, Any]:
        module_name, component_name, args_name = self.component.split(":")
        module = importlib.import_module(module_name)
        args = getattr(module, args_name)(stack=stack, config=config, image_ref=image_ref(), secrets=secrets)
        return dict(getattr(module, component_name)(stack, args).exports)


class OpsFromRunsLibrary:
    """status, logs and fetch answered by the backend's runs library (`runs`: a module with those functions)."""

    runs: ClassVar[ModuleType]

    def status(self, stack: str, config: StackConfig, environ: Mapping[str, str]) -> Report:
        return self.runs.status(stack, config, environ)

    def logs(self, stack: str, config: StackConfig, environ: Mapping[str, str], emit: Callable[[str], None]) -> Report:
        return self.runs.logs(stack, config, environ, emit)

    def fetch(self, stack: str, config: StackConfig, destination: Path, environ: Mapping[str, str]) -> Report:
        return self.runs.fetch(stack, config, destination, environ)


def short_error(error: Exception) -> str:
    """An error in one short line, for a note on where a price came from."""
    text = str(error) or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def names() -> tuple[str, ...]:
    return tuple(BACKEND_MODULES)


def policies_module(name: str) -> str:
    """The module holding the backend's policy-pack policies (POLICIES), beside its backend module."""
    return BACKEND_MODULES[name].rsplit(".", 1)[0] + ".policies"


def get(name: str) -> Backend:
    """The backend of a provider name (the schema has already refused unknown names)."""
    try:
        module = BACKEND_MODULES[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; allowed: {', '.join(BACKEND_MODULES)}") from None
    return importlib.import_module(module).BACKEND
