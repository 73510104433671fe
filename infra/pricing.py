"""How long a run takes and what that costs, whatever the cloud: seconds per step and the estimate arithmetic.

GPUs are named by the id CUDA reports (RunPod's catalog ids are the same names); each backend's catalog
(infra/<backend>_backend/catalog.py) says what its hardware costs per hour and which GPU it is.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from contract.families import FAMILIES, facts_for
from infra.paths import REPO_ROOT

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
    # consumer cards a local stack may name (infra/local_backend/catalog.py)
    "NVIDIA GeForce RTX 3060": 0.3, "NVIDIA GeForce RTX 3070": 0.4, "NVIDIA GeForce RTX 3080": 0.5,
    "NVIDIA GeForce RTX 4070 Ti SUPER": 0.65, "NVIDIA GeForce RTX 4080": 0.75,
    # Lambda Cloud's GPUs not above (by CUDA's names)
    "NVIDIA A10": 0.45, "Quadro RTX 6000": 0.4, "NVIDIA A100-PCIE-40GB": 1.2, "NVIDIA A100-SXM4-40GB": 1.4,
    "NVIDIA GH200 480GB": 2.6, "NVIDIA B200": 4.0,
    # Hugging Face Jobs' GPUs not above
    "NVIDIA A10G": 0.45, "NVIDIA RTX PRO 6000 Blackwell Server Edition": 1.6,
}
STARTUP_SECONDS = 600  # image pull, model download into the volume cache, latent caching: first run


BENCH_RESULTS_DIR = REPO_ROOT / "bench" / "results"


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
    family: str, gpu_id: str, resolution: int, batch_size: int, results_dir: Path = BENCH_RESULTS_DIR,
    base_model: str | None = None,
) -> float:
    """Measured or estimated time of one step; scaled by pixels and batch from the nearest known row.

    A base model of one of the family's variants (SD 2.1, SD 3.5 large) is timed from its variant's figures: the
    benchmark measures each family's first base model."""
    facts = facts_for(family)
    if base_model is not None and facts.variant_for(base_model) is not None:
        facts = facts.for_base_model(base_model)
        table = {(family, gpu, facts.native_resolution): seconds for gpu, seconds in facts.seconds_per_step.items()}
    else:
        measured = measured_seconds_per_step(results_dir)
        exact = measured.get((family, gpu_id, resolution, batch_size))
        if exact is not None:
            return exact
        # measured batch-1 rows take the place of the estimates
        table = {**SECONDS_PER_STEP, **{(f, g, r): s for (f, g, r, b), s in measured.items() if b == 1}}
    reference = facts.native_resolution
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


def estimate_run(
    usd_per_hour: float, source: str, family: str, gpu_id: str, resolution: int, batch_size: int,
    accumulation: int, steps: int, gpu_count: int = 1, base_model: str | None = None,
) -> CostEstimate:
    per_step = seconds_per_step(family, gpu_id, resolution, batch_size, base_model=base_model)
    per_step = per_step * accumulation / max(gpu_count, 1) ** 0.9
    hours = (steps * per_step + STARTUP_SECONDS) / 3600
    return CostEstimate(usd_per_hour, per_step, hours, usd_per_hour * hours, source)
