"""Vast.ai GPUs as the marketplace names them (an offer's `gpu_name`), their memory, and dated typical prices.

Vast.ai has no price list: hosts set their own per-second rates and every offer carries its `dph_total` ($/h,
GPU plus the disk asked for). So the price a run is billed at is bounded by the stack's ceiling
(`maxUsdPerHour`, the offer search's `dph_total` filter), and that ceiling is what the cost estimate and the
money limit use. The table below is for the cost notes and for refusing a ceiling no offer can meet.
"""

from __future__ import annotations

from dataclasses import dataclass

VAST_PRICES_SOURCE = (
    "Vast.ai on-demand marketplace rates, low end, recorded by usagepricing.com/blueprint/vast-ai (June 2026) and "
    "fairlane.systems/en/wissen/tool-vast-ai (May 2026), copied 2026-11-30"
)
PRICES_COPIED = "copied 2026-11-30"
LIVE_PRICES_SOURCE = "Vast.ai offer search (POST /api/v0/bundles/, live): the cheapest matching offer"


@dataclass(frozen=True)
class VastGpu:
    name: str  # the offer's gpu_name
    cuda_name: str  # the name CUDA reports (infra/pricing.py's speed table)
    memory_gb: int
    typical_usd: float  # per GPU per hour, on-demand, low end of the recorded range


VAST_GPUS: dict[str, VastGpu] = {
    gpu.name: gpu
    for gpu in (
        VastGpu("RTX 3090", "NVIDIA GeForce RTX 3090", 24, 0.18),
        VastGpu("RTX 4090", "NVIDIA GeForce RTX 4090", 24, 0.45),
        VastGpu("RTX 5090", "NVIDIA GeForce RTX 5090", 32, 0.87),
        VastGpu("RTX A6000", "NVIDIA RTX A6000", 48, 0.55),
        VastGpu("A100 SXM4", "NVIDIA A100-SXM4-80GB", 80, 0.78),
        VastGpu("H100 SXM", "NVIDIA H100 80GB HBM3", 80, 1.85),
        VastGpu("H100 NVL", "NVIDIA H100 NVL", 94, 2.53),
        VastGpu("H200", "NVIDIA H200", 141, 3.50),
    )
}


def ceiling_source(gpu: VastGpu, count: int) -> str:
    """Where the estimate's rate comes from when no live offer was read: the ceiling, beside the dated rates."""
    return (f"the stack's ceiling lorastack:vast.maxUsdPerHour (offers from ${gpu.typical_usd * count:.2f}/h on the "
            f"Vast.ai marketplace, {PRICES_COPIED})")
