"""FLOPs of a training step, counted with torch.utils.flop_counter on the meta device (no memory, no GPU).

The models come from `training.models.load_models` (frozen base, peft LoRA, as in a run) and the loss from
`training.loop.compute_loss`, so the count covers exactly what the trainer computes: the denoiser's
forward, the backward autograd actually runs (activation gradients and LoRA weight gradients; none for
frozen weights, none before the first LoRA layer), plus the VAE and text encoders when the spec does not
cache their outputs or trains a text encoder.

These are model FLOPs: counted without gradient checkpointing (recomputation is extra work, not model
work) and with SDPA decomposed into its two matmuls (the meta device has no fused kernel), so attention's
backward counts 2x its forward. flop_counter's formula for the fused CUDA kernels also counts their
recomputed scores (2.5x), which is why a count taken on a GPU comes out higher.
"""

from __future__ import annotations

import types
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.models import Architecture, in_memory_source
from contract.families import facts_for
from contract.spec import TrainSpec
from training.latents import Batch
from training.loop import compute_loss
from training.models import load_models
from training.state import TrainState

META = torch.device("meta")
LORA_LEAVES = (".lora_A.default", ".lora_B.default")  # peft's module names for the default adapter


@dataclass(frozen=True)
class StepFlops:
    batch_size: int
    forward: int  # loss forward, LoRA included
    backward: int
    lora_forward: int  # the LoRA layers' share of `forward`
    forward_by_op: dict[str, int]
    backward_by_op: dict[str, int]

    @property
    def total(self) -> int:
        return self.forward + self.backward

    @property
    def base_forward(self) -> int:
        """The frozen model's forward alone (what a model card's "FLOPs per image" usually means)."""
        return self.forward - self.lora_forward

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "total": self.total, "base_forward": self.base_forward}


def _meta_batch(state: TrainState, size: int) -> Batch:
    """A batch as `training.latents.collate` hands it to the step: cached features where the spec caches them.

    The features come from the bundle's own encoders (shapes exactly as the cache would hold them); the SDXL
    micro-conditioning is a square, uncropped image.
    """
    spec, models = state.spec, state.models
    side = spec.resolution
    pixels = torch.empty(size, 3, side, side, device=META)
    captions = ["a photo"] * size
    time_ids = torch.tensor([[side, side, 0, 0, side, side]] * size, dtype=torch.float32)
    ids = [f"meta-{index}" for index in range(size)]
    if not spec.cache_latents:
        return Batch(ids, captions, latents=None, pixels=pixels, text=None, time_ids=time_ids)
    with torch.no_grad():
        latents = models.encode_images(pixels)
        text = None if spec.train_text_encoder else models.encode_text(models.tokenize(captions))
        image = models.encode_image_conditioning(pixels)
    return Batch(ids, captions, latents=latents, pixels=None, text=text or None, time_ids=time_ids, image=image or None)


def _by_op(counter: FlopCounterMode) -> dict[str, int]:
    return {str(op): int(flops) for op, flops in counter.get_flop_counts()["Global"].items()}


def count_step_flops(model: Architecture, spec: TrainSpec, batch_size: int) -> StepFlops:
    """Forward and backward FLOPs of one micro-batch of `batch_size` at `spec`'s settings."""
    spec = spec.model_copy(update={"gradient_checkpointing": "off", "batch_size": batch_size})
    models = load_models(spec, META, source=in_memory_source(model, META))
    unused: Any = None  # what compute_loss never reads: no files, data, optimizer or schedule on the meta device
    state = TrainState(
        spec=spec,
        paths=unused,
        models=models,
        dataset=unused,
        features=None,
        sampler=unused,
        accelerator=types.SimpleNamespace(device=META),  # compute_loss asks the accelerator for its device only
        trained=models.trained_modules(),
        optimizer=unused,
        lr_scheduler=unused,
        noise_generator=torch.Generator().manual_seed(spec.seed),
    )
    batch = _meta_batch(state, batch_size)
    with FlopCounterMode(display=False) as forward:
        loss = compute_loss(state, batch)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    lora_forward = sum(
        sum(by_op.values()) for module, by_op in forward.get_flop_counts().items() if module.endswith(LORA_LEAVES)
    )
    return StepFlops(
        batch_size=batch_size,
        forward=forward.get_total_flops(),
        backward=backward.get_total_flops(),
        lora_forward=int(lora_forward),
        forward_by_op=_by_op(forward),
        backward_by_op=_by_op(backward),
    )


METHOD = (
    "training.models.load_models and training.loop.compute_loss on torch.device('meta') with the published "
    "configs, torch.utils.flop_counter, batch 1, no gradient checkpointing, SDPA as two matmuls"
)


def per_image_counts(stacks: list[tuple[str, TrainSpec]], architectures: dict[str, Architecture]) -> list[dict]:
    """Per stack: the denoiser alone with every feature cached (the issue's setting), and the stack's own
    settings where they differ (a trained text encoder runs in every step)."""
    counts = []
    for name, spec in stacks:
        cached = spec.model_copy(
            update={"cache_latents": True, "train_text_encoder": False, "text_encoder_learning_rate": None}
        )
        settings = [("denoiser, cached latents and text embeddings", cached)]
        if spec != cached:
            settings.append(
                (f"the stack's: cacheLatents {spec.cache_latents}, trainTextEncoder {spec.train_text_encoder}", spec)
            )
        for label, counted_spec in settings:
            flops = count_step_flops(architectures[spec.family], counted_spec, 1)
            counts.append({
                "family": spec.family,
                "stack": name,
                "resolution": spec.resolution,
                "rank": spec.rank,
                "settings": label,
                "flops": flops.as_json(),
                "quoted": facts_for(spec.family).quoted_tflop_per_image if counted_spec is cached else None,
            })
    return counts
