"""Stable Diffusion 1.x (and 2.x base models, which share its pipeline): one CLIP text encoder, a UNet, DDPM."""

from __future__ import annotations

from typing import Any

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

from contract.families import SD15
from training import tiny
from training.families.base import ModelFamily, StepInputs, ddpm_loss

# The attention projections diffusers' LoRA training examples adapt (train_text_to_image_lora*.py).
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


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

    def encode_text(self, encoders, token_ids, device):
        return {"prompt_embeds": encoders["text_encoder"](token_ids["tokenizer"].to(device))[0]}

    def loss(self, models, denoiser, inputs: StepInputs, spec) -> torch.Tensor:
        return ddpm_loss(models, denoiser, inputs, spec)

    def tiny_pipeline(self) -> StableDiffusionPipeline:
        tokenizer = tiny.clip_tokenizer()
        unet = UNet2DConditionModel(
            sample_size=32,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=tiny.TEXT_WIDTH,
            attention_head_dim=8,
            norm_num_groups=16,
        )
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
            text_encoder=CLIPTextModel(tiny.clip_text_config(len(tokenizer))),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            **self.pipeline_extras,
        )

    def kohya_sd2_base(self, denoiser_config: Any) -> bool:
        # SD 2.x runs through this family; its UNet attends to OpenCLIP ViT-H's 1024-wide states (SD 1.x: 768)
        return getattr(denoiser_config, "cross_attention_dim", None) == 1024


FAMILY = StableDiffusion()
