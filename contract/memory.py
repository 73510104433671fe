"""Peak GPU memory of a LoRA training step, estimated from the spec alone (no torch).

Two users: infra refuses a stack whose settings cannot fit the chosen GPU before anything is billed, and
the trainer decides `gradientCheckpointing: auto` with the same numbers. The per-family figures
(`contract.families`, `FamilyFacts.memory`) are bf16 measurements' orders of magnitude (frozen base weights,
SDPA attention, activations linear in pixels); `bench/` keeps them honest. They are not measurements yet:
`make bench` on a GPU records the peak memory of each stack's settings with checkpointing off and on
(bench/results/<gpu>.json, `peak_memory_gib`), the figures to put there.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.families import facts_for
from contract.spec import TrainSpec

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OVERHEAD_GIB = 1.5  # CUDA context, allocator fragmentation, LoRA params and optimizer state


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    activations_gib: float
    gradient_checkpointing: bool

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.activations_gib + OVERHEAD_GIB


def estimate(spec: TrainSpec, gradient_checkpointing: bool) -> MemoryEstimate:
    footprint = facts_for(spec.family, spec.base_model).memory
    width = BYTES[spec.precision]
    params = footprint.denoiser_params_b + (0 if spec.cache_latents else footprint.encoders_params_b)
    weights = params * 1e9 * width / 2**30
    per_image = footprint.activations_checkpointed_gib if gradient_checkpointing else footprint.activations_gib
    scale = (spec.resolution * spec.resolution) / footprint.reference_pixels * (width / 2)
    activations = per_image * scale * spec.batch_size * (1.3 if spec.train_text_encoder else 1.0)
    return MemoryEstimate(weights, activations, gradient_checkpointing)


def plan(spec: TrainSpec, gpu_memory_gib: float) -> MemoryEstimate:
    """The estimate the run will use: checkpointing on only when `auto` needs it (or `on` asks for it)."""
    if spec.gradient_checkpointing == "on":
        return estimate(spec, True)
    fast = estimate(spec, False)
    if spec.gradient_checkpointing == "off" or fast.total_gib <= gpu_memory_gib * 0.92:
        return fast
    return estimate(spec, True)


def fits(spec: TrainSpec, gpu_memory_gib: float) -> tuple[bool, str]:
    """Whether the run fits one GPU of that size, and the reason in words when it does not."""
    chosen = plan(spec, gpu_memory_gib)
    budget = gpu_memory_gib * 0.92
    if chosen.total_gib <= budget:
        return True, ""
    hint = (
        "set gradientCheckpointing to auto or on, " if not chosen.gradient_checkpointing else ""
    ) + "lower batchSize or resolution, use bf16, keep cacheLatents on, or pick a larger GPU"
    return False, (
        f"needs about {chosen.total_gib:.0f} GiB (weights {chosen.weights_gib:.1f}, activations "
        f"{chosen.activations_gib:.1f} for batch {spec.batch_size} at {spec.resolution}px, "
        f"checkpointing {'on' if chosen.gradient_checkpointing else 'off'}) but a {gpu_memory_gib:g} GB card "
        f"leaves about {budget:.0f}: {hint}"
    )
