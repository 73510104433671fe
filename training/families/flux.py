"""FLUX.1: CLIP (pooled) and T5 (sequence) text encoders, a joint-attention transformer on packed latents,
rectified-flow (flow matching) training, as diffusers' train_dreambooth_lora_flux.py."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from contract.families import FLUX
from training import tiny
from training.families.base import ModelFamily, StepInputs, flow_matching_loss

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
# train_dreambooth_lora_flux.py's default: FLUX.1-dev is guidance-distilled and trains with this embedding.
TRAINING_GUIDANCE = 3.5


class Flux(ModelFamily):
    facts = FLUX
    components = {
        "transformer": FluxTransformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": T5EncoderModel,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": T5Tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }
    pipeline_class = FluxPipeline
    sample_scheduler_class = FlowMatchEulerDiscreteScheduler
    lora_targets = FLUX_LORA_TARGETS
    lora_loader = FluxLoraLoaderMixin

    def max_token_length(self, name: str, tokenizer: Any) -> int:
        length = tokenizer.model_max_length
        return min(length, T5_MAX_LENGTH) if name == "tokenizer_2" else length

    def encode_text(self, encoders, token_ids, device):
        pooled = encoders["text_encoder"](token_ids["tokenizer"].to(device)).pooler_output
        hidden = encoders["text_encoder_2"](token_ids["tokenizer_2"].to(device))[0]
        return {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}

    def latent_shift(self, vae_config: Any) -> float:
        return vae_config.shift_factor or 0.0

    def loss(self, models, denoiser, inputs: StepInputs, spec) -> torch.Tensor:
        """Rectified flow on packed latents, with train_dreambooth_lora_flux.py's timestep density and loss
        weighting (uniform and unweighted unless the stack says otherwise)."""
        size, channels, height, width = inputs.latents.shape
        device, dtype = inputs.latents.device, inputs.latents.dtype
        image_ids = FluxPipeline._prepare_latent_image_ids(size, height // 2, width // 2, device, dtype)
        prompt_embeds = inputs.text["prompt_embeds"]
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if models.denoiser.config.guidance_embeds:
            guidance = torch.full((size,), TRAINING_GUIDANCE, device=device, dtype=torch.float32)
        scale = models.vae_scale_factor

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            prediction = denoiser(
                hidden_states=FluxPipeline._pack_latents(noisy, size, channels, height, width),
                timestep=timesteps / 1000,
                guidance=guidance,
                pooled_projections=inputs.text["pooled_prompt_embeds"],
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
            return FluxPipeline._unpack_latents(prediction, height * scale, width * scale, scale)

        return flow_matching_loss(models, inputs, spec, predict)

    def tiny_pipeline(self) -> FluxPipeline:
        tokenizer, tokenizer_2 = tiny.clip_tokenizer(), tiny.t5_tokenizer()
        latent_channels = 4
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=latent_channels * 4,  # latents are packed in 2x2 patches
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=tiny.TEXT_WIDTH,
            pooled_projection_dim=tiny.TEXT_WIDTH,
            guidance_embeds=True,  # as FLUX.1-dev
            axes_dims_rope=(4, 4, 8),
        )
        t5 = tiny.t5_encoder(len(tokenizer_2))
        return FluxPipeline(
            vae=tiny.vae(
                latent_channels=latent_channels,
                use_quant_conv=False,
                use_post_quant_conv=False,
                shift_factor=0.1159,
                scaling_factor=0.3611,
            ),
            text_encoder=CLIPTextModel(tiny.clip_text_config(len(tokenizer))),
            text_encoder_2=t5,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )


FAMILY = Flux()
