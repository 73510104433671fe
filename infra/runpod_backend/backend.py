"""RunPod as a lorastack backend: a network volume and a pod running our trainer image (infra.backends.Backend)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, cast

import requests

from cloudapi.runpod_rest import RunpodClient, RunpodError
from infra.backends import LivePrices, OpsError, OpsFromRunsLibrary, ReapDecision, RunsOurTrainer, short_error
from infra.local_dataset import local_folder
from infra.runpod_backend import reap as reap_rules
from infra.runpod_backend import runs
from infra.runpod_backend import s3 as runpod_s3
from infra.runpod_backend.catalog import VOLUME_USD_PER_GB_MONTH, runpod_usd_per_hour
from infra.runpod_backend.config import RunpodConfig

if TYPE_CHECKING:
    from infra.config import StackConfig


def _section(config: StackConfig) -> RunpodConfig:
    """The stack's `lorastack:runpod` section: StackConfig refuses a runpod stack without one, and this backend is
    only asked about its own stacks."""
    return cast(RunpodConfig, config.runpod)  # never None here (StackConfig's _backend check)


class RunpodBackend(RunsOurTrainer, OpsFromRunsLibrary):
    name = "runpod"
    section = RunpodConfig
    ops_secrets = ("runpodApiKey",)
    ops_optional_secrets = ("runpodS3AccessKey", "runpodS3Secret")  # make fetch reads the volume over S3
    component = "infra.runpod_backend.component:RunpodTraining:RunpodTrainingArgs"
    runs: ClassVar[ModuleType] = runs

    def check(self, config: StackConfig) -> None:
        """The RunPod section's own rules live in RunpodConfig, the memory fit comes through gpu_memory(); here: a
        local dataset folder (whose existence StackConfig checks) needs an S3-served volume to be uploaded to."""
        source = config.train.dataset.source
        if local_folder(source) is None:
            return
        runpod = _section(config)
        if runpod.volume is None:
            raise ValueError(f"lorastack:train.dataset.source = {source!r} is a folder on this machine: it is uploaded "
                             "to the network volume, so lorastack:runpod.volume must be set")
        if runpod.data_center not in runpod_s3.S3_DATA_CENTERS:
            raise ValueError(
                f"lorastack:train.dataset.source = {source!r} is a folder on this machine, uploaded through RunPod's "
                f"S3 API, which serves volumes only in {', '.join(runpod_s3.S3_DATA_CENTERS)}; lorastack:runpod."
                f"dataCenter is {runpod.data_center}: pick one of those, or put the dataset at an https URL")

    def gpu_memory(self, config: StackConfig) -> tuple[str, float]:
        return f"runpod.gpuType {_section(config).gpu_type!r}", _section(config).gpu.memory_gb

    def usd_per_hour(self, config: StackConfig, live: dict[str, dict] | None = None) -> tuple[float, str]:
        runpod = _section(config)
        return runpod_usd_per_hour(runpod.gpu_type, runpod.gpu_count, runpod.cloud, live)

    def performance_gpu(self, config: StackConfig) -> tuple[str, int]:
        return _section(config).gpu_type, _section(config).gpu_count

    def hardware(self, config: StackConfig) -> str:
        runpod = _section(config)
        return f"{runpod.gpu.name} x{runpod.gpu_count} ({runpod.cloud.lower()})"

    def cost_notes(self, stack: str, config: StackConfig) -> list[str]:
        volume = _section(config).volume
        if volume is None:
            return []
        monthly = volume.size_gb * VOLUME_USD_PER_GB_MONTH
        kept = "kept on destroy" if volume.keep_on_destroy else "deleted on destroy"
        return [f"{stack}: network volume {volume.size_gb} GB, about ${monthly:.2f}/month while it exists ({kept})"]

    def live_prices(self, environ: Mapping[str, str], timeout: float) -> LivePrices:
        """GET /v2/catalog/gpus: {catalog id: GPU type JSON}."""
        key = runs.api_key(environ)
        if not key:
            return LivePrices(None, "RunPod: the dated table; RUNPOD_API_KEY is not set (export it for live catalog prices)")
        try:
            gpus = {gpu["id"]: gpu for gpu in RunpodClient(key, retries=0, timeout=timeout).gpu_types()}
        except (RunpodError, requests.RequestException, KeyError, TypeError, ValueError) as error:
            return LivePrices(None, f"RunPod: the dated table; the catalog API did not answer usefully ({short_error(error)})")
        fetched_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return LivePrices(gpus, f"RunPod: live GPU catalog (GET /v2/catalog/gpus), fetched {fetched_at}")

    def live_warnings(self, config: StackConfig, live: Any) -> list[str]:
        return []  # every catalog id is validated offline (RUNPOD_GPUS); a live price only replaces the table's

    def reap(self, live_stacks: set[str], environ: Mapping[str, str], *, dry_run: bool,
             grace_minutes: float) -> list[ReapDecision]:
        key = runs.api_key(environ)
        if not key:  # no RunPod account here: the other backends are still reaped
            print("RunPod: RUNPOD_API_KEY is not set, so its pods were not checked (export it, RunPod console > "
                  "Settings > API Keys, or set runpodApiKey in a stack's secret config)", file=sys.stderr, flush=True)
            return []
        try:
            return reap_rules.reap(RunpodClient(key), live_stacks, dry_run=dry_run, now=datetime.now(UTC),
                                   grace_minutes=grace_minutes)
        except RunpodError as error:
            raise OpsError(f"{error} {runs.API_HINT}") from None


BACKEND = RunpodBackend()
