"""Hugging Face Jobs hardware flavors (GPU, memory, $/hour), dated: the offline fallback and the validation list.

Flavor names are the client's `JobHardware` enum (huggingface_hub 2.4.0, "kept in sync with the Hub API");
prices are per hour from huggingface/hub-docs `docs/hub/jobs-pricing.md` (commit 0b8c07f8210e), billed per minute
while a job is starting or running. `make cost` prefers the live `GET /api/jobs/hardware` prices when reachable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HFJOBS_PRICES_SOURCE = ("Hugging Face Jobs pricing (hub-docs jobs-pricing.md at commit 0b8c07f8210e, an undated copy), "
                        "list $/hour, billed per minute")
LIVE_PRICES_SOURCE = "Hugging Face Jobs hardware API (live)"
BILLING_SECONDS = 60  # billed per started minute while Starting or Running
# after a limit the trainer saves a checkpoint and uploads it to the Hub repo: the timeout leaves it this long
FINAL_CHECKPOINT_S = 2 * 60


@dataclass(frozen=True)
class Flavor:
    name: str  # the Jobs API flavor, what a job is created with
    gpu: str  # CUDA's name of the card (infra/pricing.py RELATIVE_SPEED keys)
    gpu_count: int
    memory_gb: int  # per GPU
    usd_per_hour: float  # the whole flavor


HFJOBS_FLAVORS: dict[str, Flavor] = {
    flavor.name: flavor
    for flavor in (
        Flavor("t4-small", "NVIDIA T4", 1, 16, 0.40),
        Flavor("t4-medium", "NVIDIA T4", 1, 16, 0.60),
        Flavor("l4x1", "NVIDIA L4", 1, 24, 0.80),
        Flavor("l4x4", "NVIDIA L4", 4, 24, 3.80),
        Flavor("l40sx1", "NVIDIA L40S", 1, 48, 1.80),
        Flavor("l40sx4", "NVIDIA L40S", 4, 48, 8.30),
        Flavor("l40sx8", "NVIDIA L40S", 8, 48, 23.50),
        Flavor("a10g-small", "NVIDIA A10G", 1, 24, 1.00),
        Flavor("a10g-large", "NVIDIA A10G", 1, 24, 1.50),
        Flavor("a10g-largex2", "NVIDIA A10G", 2, 24, 3.00),
        Flavor("a10g-largex4", "NVIDIA A10G", 4, 24, 5.00),
        Flavor("a100-large", "NVIDIA A100-SXM4-80GB", 1, 80, 2.50),
        Flavor("a100x4", "NVIDIA A100-SXM4-80GB", 4, 80, 10.00),
        Flavor("a100x8", "NVIDIA A100-SXM4-80GB", 8, 80, 20.00),
        Flavor("h200", "NVIDIA H200", 1, 141, 5.00),
        Flavor("h200x2", "NVIDIA H200", 2, 141, 10.00),
        Flavor("h200x4", "NVIDIA H200", 4, 141, 20.00),
        Flavor("h200x8", "NVIDIA H200", 8, 141, 40.00),
        Flavor("rtx-pro-6000", "NVIDIA RTX PRO 6000 Blackwell Server Edition", 1, 96, 2.75),
        Flavor("rtx-pro-6000x2", "NVIDIA RTX PRO 6000 Blackwell Server Edition", 2, 96, 5.50),
        Flavor("rtx-pro-6000x4", "NVIDIA RTX PRO 6000 Blackwell Server Edition", 4, 96, 11.00),
        Flavor("rtx-pro-6000x8", "NVIDIA RTX PRO 6000 Blackwell Server Edition", 8, 96, 22.00),
    )
}


def hfjobs_usd_per_hour(flavor: str, live: dict[str, dict] | None = None) -> tuple[float, str]:
    """$/hour of a flavor; `live` is `{name: hardware JSON}` from GET /api/jobs/hardware when it was reachable."""
    item = (live or {}).get(flavor)
    if item is not None and isinstance(item.get("unitCostUSD"), (int, float)) and item.get("unitLabel") == "minute":
        return item["unitCostUSD"] * 60, LIVE_PRICES_SOURCE
    return HFJOBS_FLAVORS[flavor].usd_per_hour, HFJOBS_PRICES_SOURCE


def timeout_seconds(max_hours: float, max_cost_usd: float, usd_per_hour: float) -> int:
    """The job's timeoutSeconds: the time limit, or sooner the time the money limit buys at the flavor's price, in
    whole billed minutes (rounded down, at least one), plus FINAL_CHECKPOINT_S. The trainer stops itself at its
    limits and then saves and uploads a last checkpoint; the timeout is the platform's backstop for a trainer
    that cannot stop itself, and must not cut that last upload short."""
    hours = min(max_hours, max_cost_usd / usd_per_hour) if usd_per_hour > 0 else max_hours
    limit = max(BILLING_SECONDS, math.floor(hours * 3600 / BILLING_SECONDS) * BILLING_SECONDS)
    return limit + FINAL_CHECKPOINT_S
