"""Replicate as a lorastack backend: a destination model, a training by a Replicate trainer, an optional deployment
(infra.backends.Backend). The trainer is Replicate's model, not our image, so the memory fit rule is not ours to run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from infra.backends import LivePrices, OpsError, ReapDecision, Report, short_error
from infra.credentials import SECRETS
from infra.replicate_backend.catalog import REPLICATE_HARDWARE_USD_PER_SECOND, REPLICATE_PRICES_SOURCE, REPLICATE_SKU_GPU
from infra.replicate_backend.config import ReplicateConfig

if TYPE_CHECKING:
    from infra.config import StackConfig

DEFAULT_BASE_URL = "https://api.replicate.com"
FLUX_ONLY_TRAINER = "ostris/flux-dev-lora-trainer"


class ReplicateBackend:
    name = "replicate"
    section = ReplicateConfig

    def check(self, config: StackConfig) -> None:
        trainer = config.replicate.trainer
        if config.train.family != "flux" and trainer == FLUX_ONLY_TRAINER:
            raise ValueError(
                f"train.family is {config.train.family} but the Replicate trainer {trainer} "
                "trains FLUX only; set replicate.trainer to a trainer for that family"
            )

    def gpu_memory(self, config: StackConfig) -> None:
        return None  # Replicate's trainer manages its own memory

    def usd_per_hour(self, config: StackConfig, live: Any = None) -> tuple[float, str]:
        # GET /v1/hardware lists SKUs but no prices: the dated table is the only price there is
        return REPLICATE_HARDWARE_USD_PER_SECOND[config.replicate.training_hardware] * 3600, REPLICATE_PRICES_SOURCE

    def performance_gpu(self, config: StackConfig) -> tuple[str, int]:
        return REPLICATE_SKU_GPU[config.replicate.training_hardware], 1

    def hardware(self, config: StackConfig) -> str:
        return config.replicate.training_hardware

    def cost_notes(self, stack: str, config: StackConfig) -> list[str]:
        return []

    def live_prices(self, environ: Mapping[str, str], timeout: float) -> LivePrices:
        """GET /v1/hardware: the set of SKUs Replicate offers now."""
        token = environ.get(SECRETS["replicateApiToken"])
        if not token:
            return LivePrices(None, "Replicate: the dated table; REPLICATE_API_TOKEN is not set, so the SKU was not "
                                    "checked against Replicate's hardware list")
        base = environ.get("REPLICATE_BASE_URL", DEFAULT_BASE_URL).rstrip("/").removesuffix("/v1")
        try:
            response = requests.get(f"{base}/v1/hardware", headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
            response.raise_for_status()
            skus = {item["sku"] for item in response.json()}
        except (requests.RequestException, KeyError, TypeError, ValueError) as error:
            return LivePrices(None, f"Replicate: the dated table; GET /v1/hardware did not answer usefully "
                                    f"({short_error(error)})")
        fetched_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return LivePrices(skus, f"Replicate: the dated table (GET /v1/hardware lists no prices); SKUs checked against "
                                f"it at {fetched_at}")

    def live_warnings(self, config: StackConfig, live: set[str] | None) -> list[str]:
        if live is None:
            return []
        return [f"Replicate no longer lists hardware {sku!r} (GET /v1/hardware); pick another SKU"
                for sku in {config.replicate.hardware, config.replicate.training_hardware} if sku not in live]

    def build(self, stack: str, config: StackConfig, secrets: Mapping[str, Any],
              image_ref: Callable[[], Any]) -> dict[str, Any]:
        # Replicate's trainer runs, not our image: image_ref is not asked for (nothing is built)
        from infra.replicate_backend.component import ReplicateTraining, ReplicateTrainingArgs

        return dict(ReplicateTraining(stack, ReplicateTrainingArgs(stack=stack, config=config, secrets=secrets)).exports)

    def status(self, stack: str, config: StackConfig, environ: Mapping[str, str]) -> Report:
        raise OpsError(_pointer(config, "status"))

    def logs(self, stack: str, config: StackConfig, environ: Mapping[str, str], emit: Callable[[str], None]) -> Report:
        raise OpsError(_pointer(config, "logs"))

    def fetch(self, stack: str, config: StackConfig, destination: Path, environ: Mapping[str, str]) -> Report:
        raise OpsError(_pointer(config, "fetch"))

    def reap(self, live_stacks: set[str], environ: Mapping[str, str], *, dry_run: bool,
             grace_minutes: float) -> list[ReapDecision]:
        # Nothing of ours bills by the hour unwatched: a training ends at its own limits (the Training provider
        # cancels it at the money limit) and a deployment scales to zero unless the stack pays for warm instances.
        return []


def _pointer(config: StackConfig, command: str) -> str:
    replicate = config.replicate
    return (f"`make {command}` follows RunPod pods; this stack trains on Replicate: see "
            f"https://replicate.com/{replicate.owner}/{replicate.model} (its trainings and versions), or "
            "`pulumi stack output --stack <stack>` for the training id")


BACKEND = ReplicateBackend()
