"""Hugging Face Jobs as a lorastack backend: a Hub repo for checkpoints and the LoRA, and a job running our trainer
image (infra.backends.Backend)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar

from infra.backends import LivePrices, OpsError, OpsFromRunsLibrary, ReapDecision, RunsOurTrainer, short_error
from infra.credentials import SECRETS
from infra.hfjobs_backend import runs
from infra.hfjobs_backend.catalog import HFJOBS_FLAVORS, hfjobs_usd_per_hour
from infra.hfjobs_backend.client import HfJobs
from infra.hfjobs_backend.config import HfJobsConfig, section_of

if TYPE_CHECKING:
    from infra.config import StackConfig


class HfJobsBackend(RunsOurTrainer, OpsFromRunsLibrary):
    name = "hfjobs"
    section = HfJobsConfig
    ops_secrets = ("hfToken",)
    ops_optional_secrets = ()
    component = "infra.hfjobs_backend.component:HfJobsTraining:HfJobsTrainingArgs"
    runs: ClassVar[ModuleType] = runs

    def check(self, config: StackConfig) -> None:
        if config.wait:
            raise ValueError("wait: true is not offered for hfjobs stacks yet: the job runs on after `pulumi up`; "
                             "follow it with `make logs` and download the LoRA with `make fetch`")

    def gpu_memory(self, config: StackConfig) -> tuple[str, float]:
        return f"hfjobs.flavor {section_of(config).flavor!r}", section_of(config).hardware.memory_gb

    def usd_per_hour(self, config: StackConfig, live: dict[str, dict] | None = None) -> tuple[float, str]:
        return hfjobs_usd_per_hour(section_of(config).flavor, live)

    def performance_gpu(self, config: StackConfig) -> tuple[str, int]:
        flavor = section_of(config).hardware
        return flavor.gpu, flavor.gpu_count

    def hardware(self, config: StackConfig) -> str:
        flavor = section_of(config).hardware
        return f"{section_of(config).flavor} ({flavor.gpu.removeprefix('NVIDIA ')} x{flavor.gpu_count})"

    def cost_notes(self, stack: str, config: StackConfig) -> list[str]:
        repo = section_of(config).checkpoint_repo
        kept = "kept on destroy" if repo.keep_on_destroy else "deleted on destroy"
        return [f"{stack}: checkpoints and LoRA in the Hub repo {repo.repo_id} (Hub storage quota of the account, "
                f"{kept}); billed per minute while the job starts or runs"]

    def live_prices(self, environ: Mapping[str, str], timeout: float) -> LivePrices:
        """GET /api/jobs/hardware: {flavor: hardware JSON} with unitCostUSD per unitLabel."""
        token = environ.get(SECRETS["hfToken"])
        if not token:
            return LivePrices(None, "Hugging Face Jobs: the dated table; HF_TOKEN is not set "
                                    "(export it for live prices)")
        try:
            items = HfJobs(token, environ=environ, retries=0).hardware()
            flavors = {item.name: {"unitCostUSD": item.unit_cost_usd, "unitLabel": item.unit_label} for item in items}
        except Exception as error:  # any failure falls back to the dated table, with the reason
            return LivePrices(None, f"Hugging Face Jobs: the dated table; the hardware API did not answer usefully "
                                    f"({short_error(error)})")
        fetched_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return LivePrices(flavors, f"Hugging Face Jobs: live hardware prices (GET /api/jobs/hardware), "
                                   f"fetched {fetched_at}")

    def live_warnings(self, config: StackConfig, live: dict[str, dict] | None) -> list[str]:
        if live is None or section_of(config).flavor in live:
            return []
        offered = ", ".join(name for name in live if name in HFJOBS_FLAVORS)
        return [f"Hugging Face Jobs no longer lists flavor {section_of(config).flavor!r} (GET /api/jobs/hardware); "
                f"GPU flavors offered: {offered}"]

    def reap(self, live_stacks: set[str], environ: Mapping[str, str], *, dry_run: bool,
             grace_minutes: float) -> list[ReapDecision]:
        """The jobs of the token's user (HF_JOBS_NAMESPACE: an organization's instead). Without HF_TOKEN there is
        nothing to look at: no job can have been started without it, and RunPod users may well have none."""
        if not environ.get(SECRETS["hfToken"]):
            return []
        jobs = runs.client(environ, environ.get("HF_JOBS_NAMESPACE") or None)
        try:
            return runs.reap(jobs, live_stacks, dry_run=dry_run, now=datetime.now(UTC),
                             grace_minutes=grace_minutes)
        except OpsError:
            raise
        except Exception as error:  # the API's answer, for a person to act on
            raise OpsError(f"Hugging Face Jobs: {short_error(error)} "
                           "(check HF_TOKEN, and HF_ENDPOINT if set)") from None


BACKEND = HfJobsBackend()
