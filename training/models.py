"""Base models: load SD 1.5 (and SD 2.x), SDXL or FLUX.1 with diffusers, add LoRA adapters with peft.

One `ModelBundle` per run holds the denoiser (UNet or FLUX transformer), the VAE, the text encoders and
tokenizers and the training noise scheduler, and knows how its family turns images into latents and
captions into the denoiser's conditioning. Frozen weights live in the run's weight dtype (bf16 where the
GPU has it, fp32 on CPU); only the LoRA parameters are trained, in fp32.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import cast_training_params
from training import memory
from contract.spec import TrainSpec

# The attention projections diffusers' LoRA training examples adapt (train_text_to_image_lora*.py).
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# train_dreambooth_lora_flux.py's list: joint-attention projections of both streams and their MLPs.
FLUX_LORA_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
T5_MAX_LENGTH = 512  # FLUX.1-dev's T5 context; tokenizers that declare less (tiny models) use theirs


def weight_dtype_for(spec: TrainSpec, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype: the spec's precision where the device supports it, fp32 on CPU."""
    if device.type != "cuda" or spec.precision == "fp32":
        return torch.float32
    if spec.precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    # fp16 asked for, or bf16 on a GPU without it; FLUX overflows fp16, so it falls back to fp32 there
    return torch.float32 if spec.family == "flux" else torch.float16


def mixed_precision_name(dtype: torch.dtype) -> str:
    """accelerate's name for the autocast that goes with these weights."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def wants_gradient_checkpointing(spec: TrainSpec, device: torch.device) -> bool:
    """`auto` asks the memory estimate with this GPU's memory; on CPU only an explicit `on` turns it on."""
    if device.type != "cuda":
        return spec.gradient_checkpointing == "on"
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return memory.plan(spec, gpu_gib).gradient_checkpointing


@dataclass
class ModelBundle:
    family: str
    denoiser: torch.nn.Module  # UNet2DConditionModel (sd15, sdxl) or FluxTransformer2DModel (flux)
    vae: AutoencoderKL
    text_encoders: dict[str, torch.nn.Module]  # "text_encoder", "text_encoder_2", as in the pipeline folders
    tokenizers: dict[str, Any]  # "tokenizer", "tokenizer_2"
    noise_scheduler: Any  # DDPMScheduler (sd15, sdxl) or FlowMatchEulerDiscreteScheduler (flux)
    weight_dtype: torch.dtype
    device: torch.device
    train_text_encoder: bool
    gradient_checkpointing: bool
    encoders_on_device: bool = field(default=True)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def denoiser_name(self) -> str:
        return "transformer" if self.family == "flux" else "unet"

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """The modules carrying LoRA adapters, by their pipeline name."""
        modules = {self.denoiser_name: self.denoiser}
        if self.train_text_encoder:
            modules.update(self.text_encoders)
        return modules

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for module in self.trained_modules().values() for p in module.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------- encoding

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the denoiser's latent space (scaled, and shifted for FLUX)."""
        pixels = pixels.to(self.vae.device, dtype=self.vae.dtype)
        # In the VAE's own dtype even inside the training step's autocast (cacheLatents: false): SDXL's VAE is
        # kept in fp32 because it overflows in fp16, and autocast would run its convolutions in fp16/bf16.
        device_type = self.vae.device.type
        no_autocast = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()  # the meta device (the benchmark's FLOP count) has no autocast
        )
        with no_autocast:
            distribution = self.vae.encode(pixels).latent_dist
        # Sample on the CPU generator, so the draw does not depend on the device (resume is exact).
        noise = torch.randn(distribution.mean.shape, generator=generator, dtype=torch.float32)
        latents = distribution.mean + distribution.std * noise.to(distribution.mean)
        shift = (self.vae.config.shift_factor or 0.0) if self.family == "flux" else 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(self.weight_dtype)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids per tokenizer, padded to the length each text encoder was trained with."""
        ids = {}
        for name, tokenizer in self.tokenizers.items():
            length = tokenizer.model_max_length
            if self.family == "flux" and name == "tokenizer_2":
                length = min(length, T5_MAX_LENGTH)
            ids[name] = tokenizer(
                captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            ).input_ids
        return ids

    def encode_text(
        self, token_ids: dict[str, torch.Tensor], encoders: dict[str, torch.nn.Module] | None = None
    ) -> dict[str, torch.Tensor]:
        """Token ids -> the denoiser's text conditioning, as each family's pipeline computes it.

        With gradients when the text encoders train (the caller decides with torch.no_grad()); `encoders`
        replaces the bundle's own, e.g. by their data-parallel wrappers.
        """
        encoders = encoders or self.text_encoders
        device = self.text_encoders["text_encoder"].device
        if self.family == "sd15":
            hidden = encoders["text_encoder"](token_ids["tokenizer"].to(device))[0]
            return {"prompt_embeds": hidden.to(self.weight_dtype)}
        if self.family == "sdxl":
            first = encoders["text_encoder"](token_ids["tokenizer"].to(device), output_hidden_states=True)
            second = encoders["text_encoder_2"](token_ids["tokenizer_2"].to(device), output_hidden_states=True)
            # SDXL conditions on both encoders' penultimate layers and the second one's projected pooled output.
            hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
            pooled = second[0]  # CLIPTextModelWithProjection's text_embeds
            return {"prompt_embeds": hidden.to(self.weight_dtype), "pooled_prompt_embeds": pooled.to(self.weight_dtype)}
        pooled = encoders["text_encoder"](token_ids["tokenizer"].to(device)).pooler_output
        hidden = encoders["text_encoder_2"](token_ids["tokenizer_2"].to(device))[0]
        return {"prompt_embeds": hidden.to(self.weight_dtype), "pooled_prompt_embeds": pooled.to(self.weight_dtype)}

    # ------------------------------------------------------------------------------ device placement

    def offload_encoders(self) -> None:
        """After caching, the VAE (and frozen text encoders) leave the GPU: their memory goes to activations."""
        if self.device.type != "cuda":
            return
        self.vae.to("cpu")
        if not self.train_text_encoder:
            for encoder in self.text_encoders.values():
                encoder.to("cpu")
        self.encoders_on_device = False
        gc.collect()
        torch.cuda.empty_cache()

    def load_encoders(self) -> None:
        if not self.encoders_on_device:
            self.vae.to(self.device)
            for encoder in self.text_encoders.values():
                encoder.to(self.device)
            self.encoders_on_device = True

    # ------------------------------------------------------------------------------------- sampling

    def pipeline(self) -> Any:
        """An inference pipeline over the live modules (LoRA applied), for sample images during training."""
        if self.family == "flux":
            return FluxPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders["text_encoder"],
                text_encoder_2=self.text_encoders["text_encoder_2"],
                tokenizer=self.tokenizers["tokenizer"],
                tokenizer_2=self.tokenizers["tokenizer_2"],
                transformer=self.denoiser,
                scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            )
        scheduler = EulerDiscreteScheduler.from_config(self.noise_scheduler.config)
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders["text_encoder"],
                text_encoder_2=self.text_encoders["text_encoder_2"],
                tokenizer=self.tokenizers["tokenizer"],
                tokenizer_2=self.tokenizers["tokenizer_2"],
                unet=self.denoiser,
                scheduler=scheduler,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoders["text_encoder"],
            tokenizer=self.tokenizers["tokenizer"],
            unet=self.denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def read_components(spec: TrainSpec, cache_dir: Path | None, weight_dtype: torch.dtype) -> dict[str, Any]:
    """Each component read straight into its dtype: FLUX in fp32 would not even fit in the pod's RAM."""
    source = spec.base_model
    common = {"revision": spec.revision, "cache_dir": cache_dir}
    weights = {**common, "torch_dtype": weight_dtype}
    # SDXL's VAE overflows in fp16; it runs once per image when latents are cached, so fp32 costs little.
    vae_dtype = torch.float32 if spec.family == "sdxl" else weight_dtype
    components: dict[str, Any] = {
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **common, torch_dtype=vae_dtype),
        "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common, dtype=weight_dtype),
    }
    if spec.family == "flux":
        components["transformer"] = FluxTransformer2DModel.from_pretrained(source, subfolder="transformer", **weights)
        components["tokenizer_2"] = T5Tokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
        components["text_encoder_2"] = T5EncoderModel.from_pretrained(
            source, subfolder="text_encoder_2", **common, dtype=weight_dtype
        )
        components["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(
            source, subfolder="scheduler", **common
        )
        return components
    components["unet"] = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights)
    # Training adds noise with DDPM whatever sampler the model ships with (diffusers' examples do the same);
    # its config keeps the model's beta schedule and prediction type (epsilon, or v for SD 2.x-v).
    components["scheduler"] = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
    if spec.family == "sdxl":
        components["tokenizer_2"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2", **common, dtype=weight_dtype
        )
    return components


ComponentSource = Callable[[TrainSpec, Path | None, torch.dtype], dict[str, Any]]


def load_models(
    spec: TrainSpec, device: torch.device, cache_dir: Path | None = None, source: ComponentSource = read_components
) -> ModelBundle:
    """Load the base model, freeze it, add LoRA adapters (seeded by spec.seed) and place it on `device`.

    `cache_dir`: where hub downloads go (the volume's HF_HOME/hub in a pod); local paths ignore it.
    `source`: where the components come from; the benchmark builds random-weight ones in memory instead.
    """
    weight_dtype = weight_dtype_for(spec, device)
    components = source(spec, cache_dir, weight_dtype)
    denoiser = components["transformer" if spec.family == "flux" else "unet"]
    text_encoders = {name: components[name] for name in ("text_encoder", "text_encoder_2") if name in components}
    tokenizers = {name: components[name] for name in ("tokenizer", "tokenizer_2") if name in components}
    vae = components["vae"]

    for module in (denoiser, vae, *text_encoders.values()):
        module.requires_grad_(False)
        module.eval()
        module.to(device)

    torch.manual_seed(spec.seed)  # the gaussian LoRA init: same seed, same starting adapter
    targets = FLUX_LORA_TARGETS if spec.family == "flux" else UNET_LORA_TARGETS
    denoiser.add_adapter(
        LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, init_lora_weights="gaussian", target_modules=targets)
    )
    if spec.train_text_encoder:
        for name, encoder in text_encoders.items():
            layers = {}
            if spec.family == "sdxl" and name == "text_encoder":
                # SDXL reads the first encoder's penultimate layer: its last layer never reaches the loss (or an
                # image), and an adapter there gets no gradient, which DistributedDataParallel refuses.
                layers = {
                    "layers_to_transform": list(range(encoder.config.num_hidden_layers - 1)),
                    "layers_pattern": "layers",
                }
            encoder.add_adapter(
                LoraConfig(
                    r=spec.rank,
                    lora_alpha=spec.lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=TEXT_ENCODER_LORA_TARGETS,
                    **layers,
                )
            )
    trained = [denoiser, *(text_encoders.values() if spec.train_text_encoder else [])]
    for module in trained:
        module.train()
    cast_training_params(trained, dtype=torch.float32)  # frozen weights stay low precision, LoRA trains in fp32

    checkpointing = wants_gradient_checkpointing(spec, device)
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
        if spec.train_text_encoder:
            for encoder in text_encoders.values():
                encoder.activation_checkpointing_enable()

    return ModelBundle(
        family=spec.family,
        denoiser=denoiser,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=components["scheduler"],
        weight_dtype=weight_dtype,
        device=device,
        train_text_encoder=spec.train_text_encoder,
        gradient_checkpointing=checkpointing,
    )
