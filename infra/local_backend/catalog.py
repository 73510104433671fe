"""The GPUs a local stack may name (`lorastack:local.gpuType`, the name `nvidia-smi` shows) and their memory.

Your own GPU bills nothing by the hour: the price is what the stack says it costs you to run it
(`usdPerHour`: electricity, amortisation), 0 by default, and then only maxHours limits a run.
"""

from __future__ import annotations

PRICE_SOURCE = "set by the stack (local.usdPerHour: electricity, amortisation); nothing billed by the hour"

# name as CUDA reports it -> memory in GB
LOCAL_GPUS: dict[str, int] = {
    "NVIDIA GeForce RTX 3060": 12,
    "NVIDIA GeForce RTX 3070": 8,
    "NVIDIA GeForce RTX 3080": 10,
    "NVIDIA GeForce RTX 3090": 24,
    "NVIDIA GeForce RTX 4070 Ti SUPER": 16,
    "NVIDIA GeForce RTX 4080": 16,
    "NVIDIA GeForce RTX 4090": 24,
    "NVIDIA GeForce RTX 5090": 32,
    "NVIDIA RTX A4000": 16,
    "NVIDIA RTX A5000": 24,
    "NVIDIA RTX A6000": 48,
    "NVIDIA RTX 6000 Ada Generation": 48,
    "NVIDIA L4": 24,
    "NVIDIA A100 80GB PCIe": 80,
    "NVIDIA H100 PCIe": 80,
}
