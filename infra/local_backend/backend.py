"""The user's own GPU as a lorastack backend: the trainer image in a container on the local Docker engine, its
checkpoints in a folder on this machine (infra.backends.Backend)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from contract.naming import pod_name, run_id
from contract.workspace import RunPaths, read_json
from infra.backends import LivePrices, OpsError, ReapDecision, Report, RunsOurTrainer
from infra.local_backend.catalog import PRICE_SOURCE
from infra.local_backend.config import LocalConfig

if TYPE_CHECKING:
    from infra.config import StackConfig


def _engine(environ: Mapping[str, str]):
    from infra.local_backend import engine  # the docker SDK: only for commands that talk to the engine

    try:
        return engine.connect(environ)
    except engine.NoEngine as error:
        raise OpsError(str(error)) from None


def _container(client, stack: str):
    """The stack's container (by its name), or None."""
    name = pod_name(stack)
    found = [c for c in client.containers.list(all=True, filters={"name": name}) if c.name == name]
    return found[0] if found else None


def _section(config: StackConfig) -> LocalConfig:
    """The stack's `lorastack:local` section: StackConfig refuses a local stack without one, and this backend is
    only asked about its own stacks."""
    return cast(LocalConfig, config.local)  # never None here (StackConfig's _backend check)


class LocalBackend(RunsOurTrainer):
    name = "local"
    section = LocalConfig
    ops_secrets = ()
    ops_optional_secrets = ()
    component = "infra.local_backend.component:LocalTraining:LocalTrainingArgs"

    def check(self, config: StackConfig) -> None:
        if config.wait:
            raise ValueError("lorastack:wait: true is not offered by provider local: the LoRA is written straight into "
                             "local.folder (see the loraDir output); follow the run with make logs")

    def gpu_memory(self, config: StackConfig) -> tuple[str, float]:
        return f"local.gpuType {_section(config).gpu_type!r}", _section(config).memory_gb

    def usd_per_hour(self, config: StackConfig, live: Any = None) -> tuple[float, str]:
        return _section(config).usd_per_hour, PRICE_SOURCE

    def performance_gpu(self, config: StackConfig) -> tuple[str, int]:
        count = _section(config).gpu_count
        return _section(config).gpu_type, count if isinstance(count, int) else 1

    def hardware(self, config: StackConfig) -> str:
        return f"{_section(config).gpu_type} (own, gpus: {_section(config).gpu_count})"

    def cost_notes(self, stack: str, config: StackConfig) -> list[str]:
        kept = "kept on destroy" if _section(config).keep_on_destroy else "deleted on destroy"
        return [f"{stack}: checkpoints in {_section(config).folder_path(stack)} on your disk ({kept})"]

    def live_prices(self, environ: Mapping[str, str], timeout: float) -> LivePrices:
        return LivePrices(None, "local: no vendor price; the stack's local.usdPerHour")

    def live_warnings(self, config: StackConfig, live: Any) -> list[str]:
        return []

    def _paths(self, stack: str, config: StackConfig) -> RunPaths:
        return RunPaths(_section(config).folder_path(stack), run_id(stack, config.train))

    def status(self, stack: str, config: StackConfig, environ: Mapping[str, str]) -> Report:
        from infra.progress import progress_from_status_file

        container = _container(_engine(environ), stack)
        paths = self._paths(stack, config)
        state = "no container" if container is None else container.status
        if container is not None and container.status == "exited":
            state += f" (exit code {container.attrs['State']['ExitCode']})"
        status = read_json(paths.status)
        if status is None:
            return Report([f"{stack}: container {state}; no status.json yet in {paths.run}"])
        progress = progress_from_status_file(status)
        step = f"{progress.step}/{progress.total}" if progress.step is not None else "-"
        loss = f"{progress.loss:.4f}" if progress.loss is not None else "-"
        return Report([f"{stack}: container {state}; run {progress.state or '?'} at step {step}, loss {loss} "
                       f"({paths.status})"])

    def logs(self, stack: str, config: StackConfig, environ: Mapping[str, str], emit: Callable[[str], None]) -> Report:
        container = _container(_engine(environ), stack)
        if container is None:
            raise OpsError(f"no container named {pod_name(stack)}: not started yet (make train STACK={stack})")
        pending = ""
        for chunk in container.logs(stream=True, follow=True):
            pending += chunk.decode(errors="replace")
            *lines, pending = pending.split("\n")
            for line in lines:
                emit(line)
        if pending:
            emit(pending)
        return Report([])

    def fetch(self, stack: str, config: StackConfig, destination: Path, environ: Mapping[str, str]) -> Report:
        paths = self._paths(stack, config)
        if not paths.lora.is_dir():
            raise OpsError(f"no LoRA yet in {paths.lora}: the run has not exported it (make status STACK={stack})")
        lines = [] if paths.done.exists() else [f"note: {paths.done} is missing: the run has not finished; copying what is there"]
        shutil.copytree(paths.lora, destination, dirs_exist_ok=True)
        return Report([*lines, f"{stack}: LoRA copied from {paths.lora} into {destination}"])

    def reap(self, live_stacks: set[str], environ: Mapping[str, str], *, dry_run: bool,
             grace_minutes: float) -> list[ReapDecision]:
        from infra.local_backend import engine
        from infra.local_backend import reap as reap_rules

        try:
            client = engine.connect(environ)
        except engine.NoEngine:
            return []  # no engine running here: no container of ours can be running either
        return reap_rules.reap(client, live_stacks, dry_run=dry_run, now=datetime.now(UTC),
                               grace_minutes=grace_minutes)


BACKEND = LocalBackend()
