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
    # sd-scripts' `ss_v2` (an SD 2.x base, OpenCLIP text encoder): A1111 files a LoRA under SD1/SD2/SDXL by it
    # and ss_base_model_version, and by default hides those that do not match the loaded checkpoint
    v2: bool = False
    # modelspec.architecture sd-scripts writes for a v-prediction base where it names that apart (SD 2.x 768-v)
    modelspec_architecture_v_prediction: str | None = None


# diffusers' train_dreambooth_lora_{sd3,flux}.py `--weighting_scheme` choices (SD 3's script omits "none"):
# the timestep density (logit_normal, mode; uniform otherwise) and the loss weighting (sigma_sqrt, cosmap;
# uniform otherwise), as diffusers.training_utils implements them
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


@dataclass(frozen=True)
class FlowMatchingDefaults:
    """The timestep density and loss weighting a flow-matching family trains with when the stack names none:
    the defaults of diffusers' LoRA example script for that model (the stack keys weightingScheme, logitMean,
    logitStd, modeScale, preconditionOutputs)."""

    weighting_scheme: str  # one of WEIGHTING_SCHEMES
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # EDM-style preconditioning (Karras et al. 2022, section 5): the prediction becomes noisy - sigma * output
    # and the target the clean latents
    precondition_outputs: bool = False


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
    # alpha/rank multiplied into lora_B of the diffusers file (training/lora_formats.py says why): FLUX and SD 3.5,
    # whose diffusers file ComfyUI loads while reading no metadata
    lora_strength_in_weights: bool = False
    variants: tuple[Variant, ...] = ()
    # hub ids of the base models the family's own figures are for (its variants list theirs): a stack naming one
    # of these, or of a variant, under another family is refused (`family_of_base_model`)
    base_models: tuple[str, ...] = ()
    flow_matching: FlowMatchingDefaults | None = None  # set exactly when objective is flow_matching

    def variant_for(self, base_model: str) -> Variant | None:
        """The variant `base_model` (a hub id, or a local copy named like one) belongs to, if any."""
        for variant in self.variants:
            if any(_names(base_model, known) for known in variant.base_models):
                return variant
        return None

    def knows(self, base_model: str) -> bool:
        """Whether `base_model` is one of this family's own base models or its variants'."""
        return any(_names(base_model, known) for known in self.base_models) or self.variant_for(base_model) is not None

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


def _names(base_model: str, known: str) -> bool:
    """Whether `base_model` is the hub id `known` (any case) or a local copy in a folder named like it."""
    wanted, known = base_model.lower().rstrip("/"), known.lower()
    return wanted == known or PurePosixPath(wanted).name == PurePosixPath(known).name


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
    base_models=(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "runwayml/stable-diffusion-v1-5",
        "CompVis/stable-diffusion-v1-4",
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
    # train_dreambooth_lora_flux.py: uniform timesteps, unweighted loss, no preconditioning option
    flow_matching=FlowMatchingDefaults(weighting_scheme="none"),
)

# SD 3.5: no published per-image FLOP figure; these are bench/flops.py's count (meta device, the published
# configs, 1024 px, rank 16, cached features). Seconds per step: no public LoRA-training timings found; derived
# from these counts at the throughput FLUX's H100 estimate implies (about 100 TFLOP/s), carried to the other
# GPUs by infra/pricing.py's relative speeds. Large on a 24 GB card needs gradient checkpointing (a quarter
# slower).
SD35_MEDIUM_TFLOP = {"forward": 10.8, "total": 25.3}
SD35_MEDIUM_SECONDS = {
    "NVIDIA H100 80GB HBM3": 0.27,
    "NVIDIA A100-SXM4-80GB": 0.45,
    "NVIDIA L40S": 0.60,
    "NVIDIA GeForce RTX 4090": 0.65,
    "NVIDIA GeForce RTX 3090": 1.10,
}
SD35_LARGE_TFLOP = {"forward": 29.6, "total": 66.0}
SD35_LARGE_SECONDS = {
    "NVIDIA H100 80GB HBM3": 0.65,
    "NVIDIA A100-SXM4-80GB": 1.05,
    "NVIDIA L40S": 1.40,
    "NVIDIA GeForce RTX 4090": 2.00,
}

# Parameters from bench/configs/sd35.json built on the meta device, the transformer's persistent positional
# table included (384^2 x 1536 for medium: 2.47B, Stability's "2.5B"; 192^2 x 2432 for large: 8.15B, "8.1B");
# encoders: CLIP-L 0.124B + CLIP-G 0.695B + T5-XXL encoder 4.76B + VAE 0.084B. Activations: FLUX's figures scaled
# by blocks x width x tokens (24 blocks, 13 with a second attention, at 1536 on 4096 + 154 tokens: about 0.3x
# FLUX's), orders of magnitude until `make bench` measures them.
SD35 = FamilyFacts(
    name="sd35",
    denoiser="transformer",
    native_resolution=1024,  # medium was trained up to 1440, large at 1024; 1024 is where both are quoted
    objective="flow_matching",
    trains_text_encoder=False,  # the example trains the two CLIPs only; lorastack adapts the transformer
    trains_in_fp16=False,
    # StableDiffusion3Pipeline's defaults: one pair for medium and large, whose cards differ (medium 40 steps at
    # 4.5, large 28 at 3.5); 28 steps keep sample images a third cheaper than 40
    sample=SampleDefaults(steps=28, guidance=7.0),
    memory=MemoryFootprint(2.47, 5.66, 1024 * 1024, 9.0, 1.8),
    seconds_per_step=SD35_MEDIUM_SECONDS,
    quoted_tflop_per_image=SD35_MEDIUM_TFLOP,
    lora_strength_in_weights=True,
    base_models=("stabilityai/stable-diffusion-3.5-medium",),
    variants=(
        Variant(
            base_models=("stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-large-turbo"),
            native_resolution=1024,
            # 38 blocks at 2432, no second attention: about 2.5x medium's activations
            memory=MemoryFootprint(8.15, 5.66, 1024 * 1024, 22.0, 4.5),
            seconds_per_step=SD35_LARGE_SECONDS,
            quoted_tflop_per_image=SD35_LARGE_TFLOP,
        ),
    ),
    # train_dreambooth_lora_sd3.py's defaults
    flow_matching=FlowMatchingDefaults(weighting_scheme="logit_normal", precondition_outputs=True),
)

# SD 2.x: SD 1.x's UNet layout with OpenCLIP ViT-H's 1024-wide text states (SD 1.x: CLIP ViT-L's 768), linear
# attention projections, 64-channel attention heads. The -base models are epsilon at 512; 2 and 2.1 v-prediction
# at 768 (their variant). Figures: bench/configs/sd2.json's parameter counts (UNet 866M; text encoder 340M + VAE
# 84M); activations as SD 1.5's (the same channels and blocks; SDPA keeps attention memory linear in pixels). No
# FLOP figure is published: quoted_tflop_per_image is bench/flops.py's meta-device count (at 512 within 0.2% of
# SD 1.5's; at 768, 2.85x SD 1.5's total at 512), and the speeds are SD 1.5's public-report estimates scaled by
# that count (no bench stack measures SD 2.x yet).
SD2 = FamilyFacts(
    name="sd2",
    denoiser="unet",
    native_resolution=512,
    objective="ddpm",
    trains_text_encoder=True,
    trains_in_fp16=True,
    sample=SampleDefaults(steps=50, guidance=7.5),  # StableDiffusionPipeline's num_inference_steps, guidance_scale
    memory=MemoryFootprint(0.87, 0.42, 512 * 512, 3.2, 0.8),
    seconds_per_step={"NVIDIA GeForce RTX 3090": 0.35, "NVIDIA GeForce RTX 4090": 0.22},
    quoted_tflop_per_image={"forward": 0.80, "total": 1.72},
    base_models=("stabilityai/stable-diffusion-2-base", "stabilityai/stable-diffusion-2-1-base"),
    variants=(
        Variant(
            base_models=("stabilityai/stable-diffusion-2", "stabilityai/stable-diffusion-2-1"),
            native_resolution=768,
            memory=MemoryFootprint(0.87, 0.42, 512 * 512, 3.2, 0.8),  # -base's architecture: its figures, at 768 px
            seconds_per_step={"NVIDIA GeForce RTX 3090": 1.00, "NVIDIA GeForce RTX 4090": 0.63},
            quoted_tflop_per_image={"forward": 2.15, "total": 4.90},
        ),
    ),
    # sd-scripts (`--v2`, `--v_parameterization`): sd_v2 / sd_v2_v, and modelspec's SD 2 architectures
    kohya=KohyaLabels(
        text_encoder_prefixes={"text_encoder": "lora_te"},
        base_model_version="sd_v2",
        modelspec_architecture="stable-diffusion-v2-512/lora",
        modelspec_implementation="diffusers",
        unet_block_names="diffusers",
        marks_v_prediction=True,
        v2=True,
        modelspec_architecture_v_prediction="stable-diffusion-v2-768-v/lora",
    ),
)

KANDINSKY22 = FamilyFacts(
    name="kandinsky22",
    denoiser="unet",
    native_resolution=768,  # the model card generates 768x768; diffusers' LoRA example trains at 768
    objective="ddpm",
    trains_text_encoder=False,  # the decoder sees no text: captions reach only the frozen prior, at sample time
    trains_in_fp16=True,  # diffusers' example trains in fp16 mixed precision
    # KandinskyV22Pipeline's defaults (num_inference_steps=100, guidance_scale=4.0); the prior runs at its own
    # (25 steps, guidance 4.0) through KandinskyV22CombinedPipeline
    sample=SampleDefaults(steps=100, guidance=4.0),
    # Parameters from the published configs (bench/configs/kandinsky22.json): decoder UNet 1.25B; MoVQ 0.07B plus
    # the prior's CLIP ViT-bigG image encoder 1.84B, resident only when latents (and image embeddings) are not
    # cached. The prior itself (1.03B + its 0.69B text encoder) is on the GPU only while samples are drawn. The
    # activation figures are orders of magnitude scaled from SD 1.5's (pixels 2.25x, a 20% wider UNet with 3 layers
    # a block, but no attention at the 96x96 level), not measurements.
    memory=MemoryFootprint(1.25, 1.91, 768 * 768, 6.0, 1.5),
    # No public timing of Kandinsky 2.2 decoder LoRA steps was found: these are SDXL's estimates scaled by the FLOPs
    # per step bench/flops.py counts at native resolution (3.9 TFLOP against SDXL's 14.2), rounded up (a smaller
    # UNet keeps a GPU less busy), until `make bench` measures them.
    seconds_per_step={
        "NVIDIA GeForce RTX 4090": 0.35,
        "NVIDIA GeForce RTX 3090": 0.55,
        "NVIDIA L40S": 0.32,
        "NVIDIA H100 80GB HBM3": 0.15,
    },
    quoted_tflop_per_image={},  # no published figure (counted: 1.99 forward, 3.92 with the LoRA backward)
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
FAMILIES: dict[str, FamilyFacts] = {facts.name: facts for facts in (SDXL, SD15, FLUX, SD2, SD35, KANDINSKY22, LDM256)}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def family_of_base_model(base_model: str) -> FamilyFacts | None:
    """The family whose own base models (or a variant's) include `base_model`; None for one no family lists."""
    return next((facts for facts in FAMILIES.values() if facts.knows(base_model)), None)


def facts_for(name: str, base_model: str | None = None) -> FamilyFacts:
    """The facts of a family (with its variant's figures for `base_model`), or a ValueError naming the families."""
    try:
        facts = FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILY_NAMES)})") from None
    return facts if base_model is None else facts.for_base_model(base_model)
