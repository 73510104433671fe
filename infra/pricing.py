"""What a run costs: RunPod's GPU catalog (ids, memory, $/hour) and Replicate's hardware prices, dated.

The tables are the offline fallback and the validation catalog: GPU ids are RunPod's catalog ids
(`GET /v2/catalog/gpus` -> `id`), data centers its `GET /v2/catalog/datacenters` ids. `make cost` and the
stack outputs prefer live prices from the API when reachable and say which source they used.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from contract.families import FAMILIES, facts_for

RUNPOD_PRICES_SOURCE = "RunPod public pricing (runpod.io/pricing), list $/GPU/hour, copied 2026-11-24"
REPLICATE_PRICES_SOURCE = "Replicate public pricing (replicate.com/pricing), $/second, undated copy (shared/reference)"
VOLUME_USD_PER_GB_MONTH = 0.07


@dataclass(frozen=True)
class GpuType:
    id: str  # RunPod catalog id, what a pod is created with
    name: str
    memory_gb: int
    secure_usd: float  # per GPU per hour
    community_usd: float | None  # None: not offered on Community Cloud


RUNPOD_GPUS: dict[str, GpuType] = {
    gpu.id: gpu
    for gpu in (
        GpuType("NVIDIA GeForce RTX 3090", "RTX 3090", 24, 0.43, 0.22),
        GpuType("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.59, 0.34),
        GpuType("NVIDIA GeForce RTX 5090", "RTX 5090", 32, 0.89, 0.69),
        GpuType("NVIDIA RTX A4000", "RTX A4000", 16, 0.25, 0.17),
        GpuType("NVIDIA RTX A5000", "RTX A5000", 24, 0.27, 0.16),
        GpuType("NVIDIA RTX A6000", "RTX A6000", 48, 0.49, 0.33),
        GpuType("NVIDIA RTX 4000 Ada Generation", "RTX 4000 Ada", 20, 0.26, 0.20),
        GpuType("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada", 48, 0.77, 0.74),
        GpuType("NVIDIA L4", "L4", 24, 0.43, None),
        GpuType("NVIDIA A40", "A40", 48, 0.40, None),
        GpuType("NVIDIA L40S", "L40S", 48, 0.86, 0.79),
        GpuType("NVIDIA A100 80GB PCIe", "A100 PCIe", 80, 1.64, 1.19),
        GpuType("NVIDIA A100-SXM4-80GB", "A100 SXM", 80, 1.74, 1.39),
        GpuType("NVIDIA H100 PCIe", "H100 PCIe", 80, 2.39, 1.99),
        GpuType("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 2.69, 2.69),
        GpuType("NVIDIA H100 NVL", "H100 NVL", 94, 2.79, 2.59),
        GpuType("NVIDIA H200", "H200 SXM", 141, 3.59, None),
    )
}

# Secure Cloud data centers that offer network volumes.
RUNPOD_DATA_CENTERS = (
    "CA-MTL-1", "CA-MTL-3", "EU-CZ-1", "EU-FR-1", "EU-NL-1", "EU-RO-1", "EU-SE-1", "EUR-IS-1", "EUR-IS-2",
    "EUR-NO-1", "US-CA-2", "US-GA-1", "US-GA-2", "US-IL-1", "US-KS-2", "US-NC-1", "US-TX-3", "US-WA-1",
    "AP-JP-1", "OC-AU-1",
)

# The GPU behind each Replicate SKU, for the seconds-per-step table.
REPLICATE_SKU_GPU = {
    "gpu-t4": "NVIDIA T4",
    "gpu-a40-large": "NVIDIA A40",
    "gpu-l40s": "NVIDIA L40S",
    "gpu-a100-large": "NVIDIA A100-SXM4-80GB",
    "gpu-h100": "NVIDIA H100 80GB HBM3",
}
REPLICATE_HARDWARE_USD_PER_SECOND = {
    "gpu-t4": 0.000225,
    "gpu-a40-large": 0.000725,
    "gpu-l40s": 0.000975,
    "gpu-a100-large": 0.0014,
    "gpu-h100": 0.001525,
}

# Seconds per optimisation step at batch 1 (family, GPU id, resolution), bf16, cached latents: each family's
# estimates from contract/families.py until `make bench` replaces a row with a measurement (bench/results/*.json).
SECONDS_PER_STEP: dict[tuple[str, str, int], float] = {
    (facts.name, gpu_id, facts.native_resolution): seconds
    for facts in FAMILIES.values()
    for gpu_id, seconds in facts.seconds_per_step.items()
}
# Relative speed of GPUs, for combinations the table lacks (RTX 4090 = 1).
RELATIVE_SPEED = {
    "NVIDIA T4": 0.2, "NVIDIA GeForce RTX 3090": 0.6, "NVIDIA GeForce RTX 4090": 1.0, "NVIDIA GeForce RTX 5090": 1.3,
    "NVIDIA RTX A4000": 0.35, "NVIDIA RTX A5000": 0.5, "NVIDIA RTX A6000": 0.6, "NVIDIA RTX 4000 Ada Generation": 0.4,
    "NVIDIA RTX 6000 Ada Generation": 1.0, "NVIDIA L4": 0.35, "NVIDIA A40": 0.55, "NVIDIA L40S": 1.1,
    "NVIDIA A100 80GB PCIe": 1.3, "NVIDIA A100-SXM4-80GB": 1.5, "NVIDIA H100 PCIe": 1.9,
    "NVIDIA H100 80GB HBM3": 2.4, "NVIDIA H100 NVL": 2.2, "NVIDIA H200": 2.6,
}
STARTUP_SECONDS = 600  # image pull, model download into the volume cache, latent caching: first run


BENCH_RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"


@functools.cache
def measured_seconds_per_step(results_dir: Path = BENCH_RESULTS_DIR) -> dict[tuple[str, str, int, int], float]:
    """(family, GPU id, resolution, batch size) -> seconds per micro-batch that `make bench` measured on a GPU.

    Only full-size rows at a stack's own settings (variant "baseline") count; the GPU id is the name CUDA
    reports, which is RunPod's id for the same card. Smoke runs on tiny models are not measurements.
    """
    measured = {}
    for path in sorted(results_dir.glob("*.json")):
        document = json.loads(path.read_text())
        environment = document.get("environment", {})
        if environment.get("device") != "cuda" or environment.get("size") != "full":
            continue
        for row in document["rows"]:
            if row["variant"] == "baseline" and row["status"] == "ok":
                key = (row["family"], environment["gpu"], row["resolution"], row["batch_size"])
                measured[key] = row["seconds_per_step"] / row["gradient_accumulation"]
    return measured


def seconds_per_step(
    family: str, gpu_id: str, resolution: int, batch_size: int, results_dir: Path = BENCH_RESULTS_DIR
) -> float:
    """Measured or estimated time of one step; scaled by pixels and batch from the nearest known row."""
    measured = measured_seconds_per_step(results_dir)
    exact = measured.get((family, gpu_id, resolution, batch_size))
    if exact is not None:
        return exact
    reference = facts_for(family).native_resolution
    # measured batch-1 rows take the place of the estimates
    table = {**SECONDS_PER_STEP, **{(f, g, r): s for (f, g, r, b), s in measured.items() if b == 1}}
    known = table.get((family, gpu_id, reference))
    if known is None:
        anchor_gpu, anchor = next((g, s) for (f, g, r), s in table.items() if f == family and r == reference)
        known = anchor * RELATIVE_SPEED.get(anchor_gpu, 1.0) / RELATIVE_SPEED.get(gpu_id, 1.0)
    return known * (resolution / reference) ** 2 * batch_size


@dataclass(frozen=True)
class CostEstimate:
    usd_per_hour: float
    seconds_per_step: float
    hours: float
    usd: float
    source: str

    def as_outputs(self) -> dict[str, object]:
        return {
            "usdPerHour": round(self.usd_per_hour, 4),
            "secondsPerStep": round(self.seconds_per_step, 3),
            "estimatedHours": round(self.hours, 2),
            "estimatedCostUsd": round(self.usd, 2),
            "priceSource": self.source,
        }


def runpod_usd_per_hour(gpu_id: str, gpu_count: int, cloud: str, live: dict[str, dict] | None = None) -> tuple[float, str]:
    """$/hour for the pod; `live` is `{id: GpuType-json}` from the catalog API when it was reachable."""
    key = "secure" if cloud == "SECURE" else "community"
    if live and gpu_id in live and live[gpu_id].get("price", {}).get(key) is not None:
        return live[gpu_id]["price"][key] * gpu_count, "RunPod GPU catalog API (live)"
    gpu = RUNPOD_GPUS[gpu_id]
    price = gpu.secure_usd if cloud == "SECURE" else gpu.community_usd
    if price is None:
        raise ValueError(f"{gpu_id} is not offered on {cloud} cloud")
    return price * gpu_count, RUNPOD_PRICES_SOURCE


def estimate_run(
    usd_per_hour: float, source: str, family: str, gpu_id: str, resolution: int, batch_size: int,
    accumulation: int, steps: int, gpu_count: int = 1,
) -> CostEstimate:
    per_step = seconds_per_step(family, gpu_id, resolution, batch_size) * accumulation / max(gpu_count, 1) ** 0.9
    hours = (steps * per_step + STARTUP_SECONDS) / 3600
    return CostEstimate(usd_per_hour, per_step, hours, usd_per_hour * hours, source)
