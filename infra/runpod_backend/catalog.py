"""RunPod's GPU catalog (ids, memory, $/hour) and data centers, dated: the offline fallback and the validation list.

GPU ids are RunPod's catalog ids (`GET /v2/catalog/gpus` -> `id`), data centers its `GET /v2/catalog/datacenters`
ids. `make cost` and the stack outputs prefer live prices from the API when reachable and say which source they used.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNPOD_PRICES_SOURCE = "RunPod public pricing (runpod.io/pricing), list $/GPU/hour, copied 2026-11-24"
LIVE_PRICES_SOURCE = "RunPod GPU catalog API (live)"
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


def runpod_usd_per_hour(gpu_id: str, gpu_count: int, cloud: str, live: dict[str, dict] | None = None) -> tuple[float, str]:
    """$/hour for the pod; `live` is `{id: GpuType-json}` from the catalog API when it was reachable."""
    key = "secure" if cloud == "SECURE" else "community"
    if live and gpu_id in live and live[gpu_id].get("price", {}).get(key) is not None:
        return live[gpu_id]["price"][key] * gpu_count, LIVE_PRICES_SOURCE
    gpu = RUNPOD_GPUS[gpu_id]
    price = gpu.secure_usd if cloud == "SECURE" else gpu.community_usd
    if price is None:
        raise ValueError(f"{gpu_id} is not offered on {cloud} cloud")
    return price * gpu_count, RUNPOD_PRICES_SOURCE
