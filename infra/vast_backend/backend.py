"""Vast.ai as a lorastack backend: the cheapest matching marketplace offer runs our trainer image, the run is
mirrored to the stack's S3-compatible bucket, the instance destroys itself when done (infra.backends.Backend)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import requests

from cloudapi.vast_rest import VastClient, VastError
from infra.backends import LivePrices, OpsError, OpsFromRunsLibrary, ReapDecision, RunsOurTrainer, short_error
from infra.vast_backend import runs
from infra.vast_backend.catalog import LIVE_PRICES_SOURCE, VAST_GPUS, VAST_PRICES_SOURCE, ceiling_source
from infra.vast_backend.config import VastConfig, section_of

if TYPE_CHECKING:
    from infra.config import StackConfig

LIVE_OFFERS_LIMIT = 1000


def matching_offers(config: StackConfig, offers: list[dict]) -> list[dict]:
    """The live offers the instance provider's search would accept for this stack."""
    vast = section_of(config)
    return [offer for offer in offers
            if offer.get("gpu_name") == vast.gpu_name and offer.get("num_gpus") == vast.gpu_count
            and float(offer.get("reliability") or offer.get("reliability2") or 0) >= vast.min_reliability
            and float(offer.get("disk_space") or 0) >= vast.disk_gb
            and (offer.get("verification") == "verified" or not vast.verified)]


class VastBackend(RunsOurTrainer, OpsFromRunsLibrary):
    name = "vast"
    section = VastConfig
    ops_secrets = ("vastApiKey",)
    ops_optional_secrets = ("bucketAccessKeyId", "bucketSecretAccessKey")  # the run mirror: make fetch
    component = "infra.vast_backend.component:VastTraining:VastTrainingArgs"
    runs: ClassVar[ModuleType] = runs

    def check(self, config: StackConfig) -> None:
        if config.wait:
            raise ValueError("wait: true is not available with provider vast (the instance destroys itself; the run "
                             "is in the bucket): set lorastack:wait: false and use `make status` / `make fetch`")

    def gpu_memory(self, config: StackConfig) -> tuple[str, float]:
        return f"vast.gpuName {section_of(config).gpu_name!r}", section_of(config).gpu.memory_gb

    def usd_per_hour(self, config: StackConfig, live: list[dict] | None = None) -> tuple[float, str]:
        """The cheapest matching live offer when fetched, else the ceiling: no offer above it is rented, so the
        money limit counted at it is never short."""
        found = matching_offers(config, live or [])
        ceiling = section_of(config).max_usd_per_hour
        cheapest = min((float(offer["dph_total"]) for offer in found if offer["dph_total"] <= ceiling), default=None)
        if cheapest is not None:
            return cheapest, LIVE_PRICES_SOURCE
        return section_of(config).max_usd_per_hour, ceiling_source(section_of(config).gpu, section_of(config).gpu_count)

    def performance_gpu(self, config: StackConfig) -> tuple[str, int]:
        return section_of(config).gpu.cuda_name, section_of(config).gpu_count

    def hardware(self, config: StackConfig) -> str:
        vast = section_of(config)
        return f"{vast.gpu_name} x{vast.gpu_count} (vast, reliability >= {vast.min_reliability:g})"

    def cost_notes(self, stack: str, config: StackConfig) -> list[str]:
        vast = section_of(config)
        typical = vast.gpu.typical_usd * vast.gpu_count
        return [
            f"{stack}: offers for {vast.gpu_count}x {vast.gpu_name} started around ${typical:.2f}/h "
            f"({VAST_PRICES_SOURCE}); the run pays at most ${vast.max_usd_per_hour:g}/h",
            f"{stack}: the instance's {vast.disk_gb} GB disk bills only while it exists (the trainer destroys it); "
            f"the bucket {vast.bucket.url} bills at your storage provider's rate and is kept",
        ]

    def live_prices(self, environ: Mapping[str, str], timeout: float) -> LivePrices:
        key = runs.api_key(environ)
        if not key:
            return LivePrices(None, "Vast.ai: the stack's price ceiling; VAST_API_KEY is not set (export it for live offers)")
        query = {"gpu_name": {"in": list(VAST_GPUS)}, "rentable": {"eq": True}, "rented": {"eq": False},
                 "order": [["dph_total", "asc"], ["id", "asc"]], "type": "on-demand", "limit": LIVE_OFFERS_LIMIT}
        try:
            offers = VastClient(key, retries=0, timeout=timeout).search_offers(query)
        except (VastError, requests.RequestException, KeyError, TypeError, ValueError) as error:
            return LivePrices(None, f"Vast.ai: the stack's price ceiling; the offer search did not answer usefully "
                                    f"({short_error(error)})")
        fetched_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return LivePrices(offers, f"Vast.ai: live offers (POST /api/v0/bundles/), fetched {fetched_at}")

    def live_warnings(self, config: StackConfig, live: Any) -> list[str]:
        if not live:
            return []
        vast = section_of(config)
        found = matching_offers(config, live)
        if not found:
            return [f"no live Vast.ai offer has {vast.gpu_count}x {vast.gpu_name}, reliability >= {vast.min_reliability:g}"
                    f" and {vast.disk_gb} GB of disk now"]
        if all(float(offer["dph_total"]) > vast.max_usd_per_hour for offer in found):
            cheapest = min(float(offer["dph_total"]) for offer in found)
            return [f"every matching Vast.ai offer costs more than maxUsdPerHour {vast.max_usd_per_hour:g} now "
                    f"(cheapest ${cheapest:.3f}/h): `up` would find none"]
        return []

    def reap(self, live_stacks: set[str], environ: Mapping[str, str], *, dry_run: bool,
             grace_minutes: float) -> list[ReapDecision]:
        if not runs.api_key(environ):  # no Vast.ai account here: the other backends are still reaped
            print("Vast.ai: VAST_API_KEY is not set, so its instances were not checked (export it to reap them)",
                  file=sys.stderr, flush=True)
            return []
        try:
            return runs.reap(runs.vast_client(environ), live_stacks, dry_run=dry_run, now=datetime.now(UTC),
                             grace_minutes=grace_minutes)
        except VastError as error:
            raise OpsError(f"{error} {runs.API_HINT}") from None


BACKEND = VastBackend()
