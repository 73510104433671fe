"""Replicate's hardware SKUs: what each bills per second and the GPU behind it (for the seconds-per-step model)."""

from __future__ import annotations

REPLICATE_PRICES_SOURCE = "Replicate public pricing (replicate.com/pricing), $/second, undated copy"

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
