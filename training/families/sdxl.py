"""SDXL: two CLIP text encoders (the second one projected and pooled), a UNet with size/crop conditioning, DDPM."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedModel

from contract.families import SDXL
from training import tiny
from training.families.base import ModelFamily, StepInputs, ddpm_loss
from training.families.sd15 import UNET_LORA_TARGETS


class StableDiffusionXL(ModelFamily):
    facts = SDXL
    components = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "scheduler": DDPMScheduler,
    }
    pipeline_class = StableDiffusionXLPipeline
    sample_scheduler_class = EulerDiscreteScheduler
    lora_targets = UNET_LORA_TARGETS
    lora_loader = StableDiffusionXLLoraLoaderMixin

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        # SDXL's VAE overflows in fp16; it runs once per image when latents are cached, so fp32 costs little.
        return torch.float32

    def text_encoder_lora_options(self, name: str, encoder: PreTrainedModel) -> dict[str, Any]:
        if name != "text_encoder":
            return {}
        # SDXL reads the first encoder's penultimate layer: its last layer never reaches the loss (or an
        # image), and an adapter there gets no gradient, which DistributedDataParallel refuses.
        return {"layers_to_transform": list(range(encoder.config.num_hidden_layers - 1)), "layers_pattern": "layers"}

    def encode_text(self, encoders, token_ids, device):
        first = encoders["text_encoder"](token_ids["tokenizer"].to(device), output_hidden_states=True)
        second = encoders["text_encoder_2"](token_ids["tokenizer_2"].to(device), output_hidden_states=True)
        # SDXL conditions on both encoders' penultimate layers and the second one's projected pooled output.
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": second[0]}  # [0]: the projected text_embeds

    def loss(self, models, denoiser, inputs: StepInputs, spec) -> torch.Tensor:
        latents = inputs.latents
        # micro-conditioning: each image's original size, crop and target size, beside the pooled text
        conditioning = {
            "added_cond_kwargs": {
                "text_embeds": inputs.text["pooled_prompt_embeds"],
                "time_ids": inputs.time_ids.to(latents.device, dtype=latents.dtype),
            }
        }
        return ddpm_loss(models, denoiser, inputs, spec, conditioning)

    def tiny_pipeline(self) -> StableDiffusionXLPipeline:
        tokenizer = tiny.clip_tokenizer()
        time_embed_dim = 8
        unet = UNet2DConditionModel(
            sample_size=32,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            transformer_layers_per_block=(1, 2),
            # six micro-conditioning numbers (original size, crop, target size) plus the pooled text embedding
            projection_class_embeddings_input_dim=6 * time_embed_dim + tiny.TEXT_WIDTH,
            cross_attention_dim=2 * tiny.TEXT_WIDTH,  # both encoders' hidden states, concatenated
            norm_num_groups=16,
        )
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            timestep_spacing="leading",
            steps_offset=1,
        )
        return StableDiffusionXLPipeline(
            vae=tiny.vae(scaling_factor=0.13025),
            text_encoder=CLIPTextModel(tiny.clip_text_config(len(tokenizer))),
            text_encoder_2=CLIPTextModelWithProjection(
                tiny.clip_text_config(len(tokenizer), projection_dim=tiny.TEXT_WIDTH)
            ),
            tokenizer=tokenizer,
            tokenizer_2=tiny.clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
        )


FAMILY = StableDiffusionXL()
