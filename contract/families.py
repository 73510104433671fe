"""What lorastack knows about each model family, without torch: names, defaults, memory, speed, labels.

The schema (`contract.spec.Family`), the memory fit (`contract.memory`), the cost model (`infra/pricing.py`),
the benchmark and the Cog predictor read their per-family facts from `FAMILIES`; the trainer's torch side
(`training/families/<name>.py`: loading, text encoding, loss, sampling, tiny models, export hooks) carries
the same name and reads the same facts. Adding a family is one entry here and one module there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Literal


@dataclass(frozen=True)
class SampleDefaults:
    """How sample images are usually generated with this family (training samples and the Cog predictor)."""

    steps: int
    guidance: float  # classifier-free guidance scale (FLUX.1-dev: the distilled guidance embedding)


@dataclass(frozen=True)
class MemoryFootprint:
    """The figures `contract.memory` estimates a step's peak GPU memory from (bf16 orders of magnitude)."""

    denoiser_params_b: float  # UNet / transformer parameters, billions
    encoders_params_b: float  # text encoders (+ VAE), billions: resident only when latents are not cached
    reference_pixels: int  # resolution at which the activation figures hold
    activations_gib: float  # per image, bf16, no gradient checkpointing
    activations_checkpointed_gib: float  # per image, bf16, with gradient checkpointing


@dataclass(frozen=True)
class KohyaLabels:
    """The kohya / webui file's family-specific names (A1111 and ComfyUI key on these exact strings)."""

    text_encoder_prefixes: dict[str, str]  # pipeline component -> kohya key prefix
    base_model_version: str  # what kohya's sd-scripts write as ss_base_model_version
    modelspec_architecture: str  # modelspec.architecture
    modelspec_implementation: str  # modelspec.implementation, as sd-scripts writes it for this family
    # The UNet module names sd-scripts' own UNet of this family has: diffusers' block names (SD 1.x/2.x, whose
    # `original_unet.py` keeps them) or the original checkpoint's LDM names (SDXL's `sdxl_original_unet.py`)
    unet_block_names: Literal["diffusers", "ldm"]
    marks_v_prediction: bool  # sd-scripts appends `_v` to ss_base_model_version for a v-prediction base


@dataclass(frozen=True)
class Variant:
    """Base models of a family whose size or native resolution differ from the family's first one (SD 2.1 at
    768 beside 2-base at 512; SD 3.5 large beside medium): their facts replace the family's for a run on them."""

    base_models: tuple[str, ...]  # hub ids, matched case-insensitively (a local copy by its folder name)
    native_resolution: int
    memory: MemoryFootprint
    seconds_per_step: dict[str, float]
    quoted_tflop_per_image: dict[str, float]


@dataclass(frozen=True)
class FamilyFacts:
    name: str  # the stack file's `train.family`
    denoiser: Literal["unet", "transformer"]  # the denoiser's pipeline component name
    native_resolution: int  # the resolution the base model was trained at (speed figures are quoted there)
    # ddpm: noise added by DDPM, target by the scheduler's prediction type (epsilon or v); flow_matching:
    # rectified flow, the target is noise - latents
    objective: Literal["ddpm", "flow_matching"]
    trains_text_encoder: bool  # whether trainTextEncoder is supported
    trains_in_fp16: bool  # False: activations overflow fp16 (bf16 or fp32 only)
    sample: SampleDefaults
    memory: MemoryFootprint
    # Seconds per optimisation step at batch 1 and native resolution, bf16, cached latents, by RunPod GPU id.
    # Estimates from public LoRA-training reports until `make bench` measures a row (bench/results/*.json).
    seconds_per_step: dict[str, float]
    # Published TFLOP per image at native resolution (the benchmark compares its count with these):
    # the frozen model's forward alone, and forward + backward with LoRA.
    quoted_tflop_per_image: dict[str, float]
    kohya: KohyaLabels | None = field(default=None)  # None: no kohya file is written (diffusers format only)
    # alpha/rank multiplied into lora_B of the diffusers file (training/lora_formats.py says why): FLUX, whose
    # diffusers file ComfyUI and Forge load while reading no metadata
    lora_strength_in_weights: bool = False
    variants: tuple[Variant, ...] = ()

    def variant_for(self, base_model: str) -> Variant | None:
        """The variant `base_model` (a hub id, or a local copy named like one) belongs to, if any."""
        wanted = base_model.lower().rstrip("/")
        folder = PurePosixPath(wanted).name
        for variant in self.variants:
            for known in variant.base_models:
                known = known.lower()
                if wanted == known or folder == PurePosixPath(known).name:
                    return variant
        return None

    def for_base_model(self, base_model: str) -> FamilyFacts:
        """These facts with the figures of the variant `base_model` belongs to (itself when none)."""
        variant = self.variant_for(base_model)
        if variant is None:
            return self
        return replace(
            self,
            native_resolution=variant.native_resolution,
            memory=variant.memory,
            seconds_per_step=variant.seconds_per_step,
            quoted_tflop_per_image=variant.quoted_tflop_per_image,
            variants=(),
        )


SDXL = FamilyFacts(
    name="sdxl",
    denoiser="unet",
    native_resolution=1024,
    objective="ddpm",
    trains_text_encoder=True,
    trains_in_fp16=True,
    # 5.0: StableDiffusionXLPipeline's own default guidance_scale (diffusers' documented default, and what
    # the trainer's samples always used); the Cog predictor's former 7.0 was the SD 1.x habit.
    sample=SampleDefaults(steps=30, guidance=5.0),
    memory=MemoryFootprint(2.57, 0.9, 1024 * 1024, 13.0, 2.6),
    seconds_per_step={
        "NVIDIA GeForce RTX 4090": 1.10,
        "NVIDIA GeForce RTX 3090": 1.80,
        "NVIDIA L40S": 1.00,
        "NVIDIA H100 80GB HBM3": 0.45,
    },
    quoted_tflop_per_image={"forward": 6.76, "total": 14.2},
    kohya=KohyaLabels(
        text_encoder_prefixes={"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
        base_model_version="sdxl_base_v1-0",
        modelspec_architecture="stable-diffusion-xl-v1-base/lora",
        modelspec_implementation="https://github.com/Stability-AI/generative-models",
        unet_block_names="ldm",
        marks_v_prediction=False,
    ),
)

SD15 = FamilyFacts(
    name="sd15",
    denoiser="unet",
    native_resolution=512,
    objective="ddpm",
    trains_text_encoder=True,
    trains_in_fp16=True,
    sample=SampleDefaults(steps=30, guidance=7.5),  # StableDiffusionPipeline's default guidance_scale
    memory=MemoryFootprint(0.86, 0.2, 512 * 512, 3.2, 0.8),
    seconds_per_step={"NVIDIA GeForce RTX 3090": 0.35, "NVIDIA GeForce RTX 4090": 0.22},
    quoted_tflop_per_image={"forward": 0.80, "total": 1.73},
    # SD 2.x runs through this family; these were trained at 768 (v-prediction), the -base ones at 512
    variants=(
        Variant(
            base_models=("stabilityai/stable-diffusion-2", "stabilityai/stable-diffusion-2-1"),
            native_resolution=768,
            memory=MemoryFootprint(0.87, 0.35, 512 * 512, 3.2, 0.8),
            seconds_per_step={"NVIDIA GeForce RTX 3090": 0.80, "NVIDIA GeForce RTX 4090": 0.50},
            quoted_tflop_per_image={"forward": 1.8, "total": 3.9},
        ),
    ),
    kohya=KohyaLabels(
        text_encoder_prefixes={"text_encoder": "lora_te"},
        base_model_version="sd_v1",
        modelspec_architecture="stable-diffusion-v1/lora",
        modelspec_implementation="diffusers",
        unet_block_names="diffusers",
        marks_v_prediction=True,
    ),
)

FLUX = FamilyFacts(
    name="flux",
    denoiser="transformer",
    native_resolution=1024,
    objective="flow_matching",
    trains_text_encoder=False,
    trains_in_fp16=False,
    sample=SampleDefaults(steps=28, guidance=3.5),  # FluxPipeline's default guidance_scale
    memory=MemoryFootprint(11.9, 4.9, 1024 * 1024, 30.0, 6.0),
    seconds_per_step={"NVIDIA H100 80GB HBM3": 1.60, "NVIDIA A100-SXM4-80GB": 3.00, "NVIDIA L40S": 4.20},
    quoted_tflop_per_image={"forward": 74.4, "total": 164.0},
    lora_strength_in_weights=True,
)

LDM256 = FamilyFacts(
    name="ldm256",
    denoiser="unet",
    native_resolution=256,
    objective="ddpm",
    # LDMTextToImagePipeline has no LoRA loader and no diffusers API loads a LoRA into LDMBert (the UNet's own
    # load_lora_adapter reads the UNet's part alone); training LDMBert's 0.58B would also spend the 8 GB it saves
    trains_text_encoder=False,
    trains_in_fp16=True,
    # 50: LDMTextToImagePipeline's default steps. 6.0, not its default guidance_scale 1.0 (which turns classifier-free
    # guidance off and gives washed-out samples): the guidance its own docstring example and the model card use.
    sample=SampleDefaults(steps=50, guidance=6.0),
    # The published configs (bench/configs/ldm256.json): UNet 0.872B (SD 1.5's UNet with 1280-wide cross-attention),
    # LDMBert 0.582B + KL-f8 autoencoder 0.084B. Activations: SD 1.5's per-pixel figures (the same UNet layout) at
    # a quarter of the pixels.
    memory=MemoryFootprint(0.872, 0.67, 256 * 256, 0.8, 0.2),
    # No public LoRA-training reports for this model: SD 1.5's 512 px times the FLOP ratio (0.37 / 1.72 TFLOP per
    # image, bench/flops.py), raised to ~0.08 s on a 4090 because a 32x32-latent step at batch 1 is bound by kernel
    # launches rather than FLOPs.
    seconds_per_step={"NVIDIA GeForce RTX 3090": 0.12, "NVIDIA GeForce RTX 4090": 0.08},
    # No published figure: bench/flops.py's count at 256 px (python -m bench writes it to bench/results/flops.json).
    quoted_tflop_per_image={"forward": 0.18, "total": 0.37},
)

# The order is the schema's: error messages list the families in it.
FAMILIES: dict[str, FamilyFacts] = {facts.name: facts for facts in (SDXL, SD15, FLUX, LDM256)}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def facts_for(name: str, base_model: str | None = None) -> FamilyFacts:
    """The facts of a family (with its variant's figures for `base_model`), or a ValueError naming the families."""
    try:
        facts = FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILY_NAMES)})") from None
    return facts if base_model is None else facts.for_base_model(base_model)
