"""Stable Diffusion 1.x: one CLIP text encoder, a UNet, DDPM. SD 2.x (training/families/sd2.py) is the same
pipeline with OpenCLIP ViT-H's wider text states; that width is what tells the two families' models apart."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from transformers import CLIPTextModel, CLIPTokenizer

from contract.families import SD2, SD15
from contract.spec import TrainSpec
from training import tiny
from training.families import family_for
from training.families.base import ModelFamily, StepInputs, ddpm_loss

# The attention projections diffusers' LoRA training examples adapt (train_text_to_image_lora*.py).
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# The families whose models are StableDiffusionPipelines: each loads the other's folders without complaint.
STABLE_DIFFUSION_FAMILIES = (SD15.name, SD2.name)


class StableDiffusion(ModelFamily):
    facts = SD15
    components = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
        "scheduler": DDPMScheduler,  # its config keeps the model's beta schedule and prediction type (epsilon, or v)
    }
    pipeline_class = StableDiffusionPipeline
    sample_scheduler_class = EulerDiscreteScheduler
    pipeline_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    lora_targets = UNET_LORA_TARGETS
    lora_loader = StableDiffusionLoraLoaderMixin
    # The width of the text states this family's UNets attend to (their cross_attention_dim): the real models'
    # (CLIP ViT-L/14: 768), then the tiny model's
    unet_text_widths: ClassVar[tuple[int, ...]] = (768, tiny.TEXT_WIDTH)

    def validate_components(self, components: dict[str, Any], spec: TrainSpec) -> None:
        width = components["unet"].config.cross_attention_dim
        if width in self.unet_text_widths:
            return
        for name in STABLE_DIFFUSION_FAMILIES:
            other = family_for(name)
            if isinstance(other, StableDiffusion) and width in other.unet_text_widths:
                raise ValueError(
                    f"{spec.base_model}: its UNet attends to {width}-wide text states, as family {other.name}'s models "
                    f"do ({self.name}'s: {self.unet_text_widths[0]}): set family: {other.name}"
                )

    def encode_text(self, encoders, token_ids, device):
        return {"prompt_embeds": encoders["text_encoder"](token_ids["tokenizer"].to(device))[0]}

    def loss(self, models, denoiser, inputs: StepInputs, spec) -> torch.Tensor:
        return ddpm_loss(models, denoiser, inputs, spec)

    def tiny_pipeline(self) -> StableDiffusionPipeline:
        tokenizer = tiny.clip_tokenizer()
        scheduler = DDPMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            clip_sample=False,
        )
        return StableDiffusionPipeline(
            vae=tiny.vae(scaling_factor=0.18215),
            text_encoder=self.tiny_text_encoder(len(tokenizer)),
            tokenizer=tokenizer,
            unet=self.tiny_unet(),
            scheduler=scheduler,
            **self.pipeline_extras,
        )

    def tiny_unet(self) -> UNet2DConditionModel:
        return UNet2DConditionModel(
            sample_size=32,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=tiny.TEXT_WIDTH,
            attention_head_dim=8,
            norm_num_groups=16,
        )

    def tiny_text_encoder(self, vocab_size: int) -> CLIPTextModel:
        return CLIPTextModel(tiny.clip_text_config(vocab_size))


FAMILY = StableDiffusion()
