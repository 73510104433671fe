"""Base models: load each family's model with diffusers, add LoRA adapters with peft.

One `ModelBundle` per run holds the denoiser (UNet or FLUX transformer), the VAE, the text encoders and
tokenizers, the components that condition on the image itself and those only samples need, and the training
noise scheduler, and knows how its family turns images into latents and captions (or the images) into the
denoiser's conditioning. Frozen weights live in the run's weight dtype (bf16 where the
GPU has it, fp32 on CPU); only the LoRA parameters are trained, in fp32.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, VQModel
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from contract import memory
from contract.spec import TrainSpec
from training.families import ModelFamily, family_for

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def weight_dtype_for(spec: TrainSpec, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype: the spec's precision where the device supports it, fp32 on CPU."""
    if device.type != "cuda" or spec.precision == "fp32":
        return torch.float32
    if spec.precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    # fp16 asked for, or bf16 on a GPU without it; a family whose activations overflow fp16 gets fp32
    return torch.float16 if family_for(spec.family).facts.trains_in_fp16 else torch.float32


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
    family: ModelFamily
    denoiser: torch.nn.Module  # the UNet or transformer
    vae: AutoencoderKL | VQModel
    text_encoders: dict[str, torch.nn.Module]  # by component name: "text_encoder", "text_encoder_2", ...
    tokenizers: dict[str, Any]  # "tokenizer", "tokenizer_2", ...
    noise_scheduler: Any  # the family's training scheduler (DDPM, flow matching)
    weight_dtype: torch.dtype
    device: torch.device
    train_text_encoder: bool
    gradient_checkpointing: bool
    encoders_on_device: bool = field(default=True)
    image_conditioning: dict[str, Any] = field(default_factory=dict)  # family.image_conditioning_names, frozen
    sample_components: dict[str, Any] = field(default_factory=dict)  # family.sample_components, on the CPU

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def denoiser_name(self) -> str:
        return self.family.denoiser_name

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
            encoded = self.vae.encode(pixels)
        distribution = getattr(encoded, "latent_dist", None)
        if distribution is None:  # a VQ autoencoder (Kandinsky's MoVQ): its unquantised latents, no posterior draw
            latents = encoded.latents
        else:
            # Sample on the CPU generator, so the draw does not depend on the device (resume is exact).
            noise = torch.randn(distribution.mean.shape, generator=generator, dtype=torch.float32)
            latents = distribution.mean + distribution.std * noise.to(distribution.mean)
        shift, scale = self.family.latent_shift(self.vae.config), self.family.latent_scale(self.vae.config)
        return ((latents - shift) * scale).to(self.weight_dtype)

    @torch.no_grad()
    def encode_image_conditioning(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> the conditioning the family takes from the images themselves (usually none)."""
        encoded = self.family.encode_image_conditioning(self.image_conditioning, pixels, self.vae.device)
        return {name: value.to(self.weight_dtype) for name, value in encoded.items()}

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids per tokenizer, padded to the length each text encoder was trained with."""
        return self.family.tokenize(self.tokenizers, captions)

    def encode_text(
        self, token_ids: dict[str, torch.Tensor], encoders: dict[str, torch.nn.Module] | None = None
    ) -> dict[str, torch.Tensor]:
        """Token ids -> the denoiser's text conditioning, as each family's pipeline computes it.

        With gradients when the text encoders train (the caller decides with torch.no_grad()); `encoders`
        replaces the bundle's own, e.g. by their data-parallel wrappers.
        """
        if not self.text_encoders:  # a denoiser trained without text (Kandinsky 2.2's decoder)
            return {}
        encoders = encoders or self.text_encoders
        device = next(next(iter(self.text_encoders.values())).parameters()).device  # where their weights are
        encoded = self.family.encode_text(encoders, token_ids, device)
        return {name: value.to(self.weight_dtype) for name, value in encoded.items()}

    # ------------------------------------------------------------------------------ device placement

    def _image_conditioning_modules(self) -> list[torch.nn.Module]:
        return [part for part in self.image_conditioning.values() if isinstance(part, torch.nn.Module)]

    def offload_encoders(self) -> None:
        """After caching, the VAE (and frozen text encoders) leave the GPU: their memory goes to activations."""
        if self.device.type != "cuda":
            return
        self.vae.to("cpu")
        for module in self._image_conditioning_modules():
            module.to("cpu")
        if not self.train_text_encoder:
            for encoder in self.text_encoders.values():
                encoder.to("cpu")
        self.encoders_on_device = False
        gc.collect()
        torch.cuda.empty_cache()

    def load_encoders(self) -> None:
        if not self.encoders_on_device:
            self.vae.to(self.device)
            for module in [*self.text_encoders.values(), *self._image_conditioning_modules()]:
                module.to(self.device)
            self.encoders_on_device = True

    # ------------------------------------------------------------------------------------- sampling

    def pipeline(self) -> Any:
        """An inference pipeline over the live modules (LoRA applied), for sample images during training; the
        sample-only components come onto the device until `release_sample_components`."""
        self._move_sample_components(self.device)
        return self.family.sample_pipeline(self)

    def release_sample_components(self) -> None:
        self._move_sample_components(torch.device("cpu"))

    def _move_sample_components(self, device: torch.device) -> None:
        if self.device.type == "cuda":
            for part in self.sample_components.values():
                if isinstance(part, torch.nn.Module):
                    part.to(device)


def read_components(spec: TrainSpec, cache_dir: Path | None, weight_dtype: torch.dtype) -> dict[str, Any]:
    """The base model's components, each read straight into its dtype, as its family loads them."""
    return family_for(spec.family).read_components(spec, cache_dir, weight_dtype)


ComponentSource = Callable[[TrainSpec, Path | None, torch.dtype], dict[str, Any]]


def load_models(
    spec: TrainSpec, device: torch.device, cache_dir: Path | None = None, source: ComponentSource = read_components
) -> ModelBundle:
    """Load the base model, freeze it, add LoRA adapters (seeded by spec.seed) and place it on `device`.

    `cache_dir`: where hub downloads go (the volume's HF_HOME/hub in a pod); local paths ignore it.
    `source`: where the components come from; the benchmark builds random-weight ones in memory instead.
    """
    family = family_for(spec.family)
    weight_dtype = weight_dtype_for(spec, device)
    components = source(spec, cache_dir, weight_dtype)
    family.validate_components(components, spec)
    denoiser = components[family.denoiser_name]
    text_encoders: dict[str, PreTrainedModel] = {name: components[name] for name in family.text_encoder_names}
    tokenizers: dict[str, Any] = {name: components[name] for name in family.tokenizer_names}
    vae = components[family.vae_name]
    image_conditioning = {name: components[name] for name in family.image_conditioning_names}
    sample_components = {name: components[name] for name in family.sample_components if name in components}

    conditioning_modules = [part for part in image_conditioning.values() if isinstance(part, torch.nn.Module)]
    for module in (denoiser, vae, *text_encoders.values(), *conditioning_modules):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    for part in sample_components.values():  # moved to the device only while samples are drawn
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False)
            part.eval()

    torch.manual_seed(spec.seed)  # the gaussian LoRA init: same seed, same starting adapter
    denoiser.add_adapter(
        LoraConfig(
            r=spec.rank, lora_alpha=spec.lora_alpha, init_lora_weights="gaussian", target_modules=family.lora_targets
        )
    )
    if spec.train_text_encoder:
        for name, encoder in text_encoders.items():
            encoder.add_adapter(
                LoraConfig(
                    r=spec.rank,
                    lora_alpha=spec.lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=family.text_encoder_lora_targets,
                    **family.text_encoder_lora_options(name, encoder),
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
        family=family,
        denoiser=denoiser,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=components["scheduler"],
        weight_dtype=weight_dtype,
        device=device,
        train_text_encoder=spec.train_text_encoder,
        gradient_checkpointing=checkpointing,
        image_conditioning=image_conditioning,
        sample_components=sample_components,
    )
