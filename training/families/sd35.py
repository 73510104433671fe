"""Stable Diffusion 3.5 (medium, large): an MMDiT transformer conditioned on two CLIPs and T5, rectified-flow
training with the SD 3 paper's timestep densities and loss weightings, as diffusers' train_dreambooth_lora_sd3.py."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders import SD3LoraLoaderMixin
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from contract.families import SD35
from training import tiny
from training.families.base import ModelFamily, StepInputs, flow_matching_loss

# train_dreambooth_lora_sd3.py's default list: the joint attention's projections of both streams. peft matches
# a target as a whole-name suffix, so SD 3.5 medium's second image self-attention (`attn2`, the dual-attention
# blocks) is not adapted, as in the example.
SD3_LORA_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]
# train_dreambooth_lora_sd3.py's --max_sequence_length default: T5 tokens the captions are encoded with
T5_MAX_LENGTH = 77
# each CLIP encoder with the tokenizer that feeds it; T5 last (the pipeline's encode_prompt order)
CLIP_ENCODERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


class StableDiffusion35(ModelFamily):
    facts = SD35
    components = {
        "transformer": SD3Transformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModelWithProjection,
        "text_encoder_2": CLIPTextModelWithProjection,
        "text_encoder_3": T5EncoderModel,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        # the hub folder's T5TokenizerFast files load in this class too (transformers 5: one tokenizers-backed T5)
        "tokenizer_3": T5Tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }
    pipeline_class = StableDiffusion3Pipeline
    sample_scheduler_class = FlowMatchEulerDiscreteScheduler
    lora_targets = SD3_LORA_TARGETS
    lora_loader = SD3LoraLoaderMixin

    def lora_file_usage(self, weight_name: str) -> str:
        # ComfyUI's SD3 key map reads diffusers' transformer names (and no alpha: it is in the weights)
        return (
            f"`{weight_name}`: the one file for diffusers (`pipeline.load_lora_weights(repo)`) and ComfyUI "
            "(`models/loras`, Load LoRA node)\n"
        )

    def max_token_length(self, name: str, tokenizer: Any) -> int:
        length = tokenizer.model_max_length
        return min(length, T5_MAX_LENGTH) if name == "tokenizer_3" else length

    def encode_text(self, encoders, token_ids, device):
        """As StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate hidden states side by side,
        zero-padded to T5's width, then T5's sequence after them; pooled: both CLIPs' projected outputs."""
        hidden, pooled = [], []
        for encoder_name, tokenizer_name in CLIP_ENCODERS.items():
            output = encoders[encoder_name](token_ids[tokenizer_name].to(device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled.append(output[0])  # text_embeds: the projected pooled output
        t5 = encoders["text_encoder_3"](token_ids["tokenizer_3"].to(device))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    def latent_shift(self, vae_config: Any) -> float:
        return vae_config.shift_factor or 0.0

    def loss(self, models, denoiser, inputs: StepInputs, spec) -> torch.Tensor:
        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return denoiser(
                hidden_states=noisy,
                timestep=timesteps,
                encoder_hidden_states=inputs.text["prompt_embeds"],
                pooled_projections=inputs.text["pooled_prompt_embeds"],
                return_dict=False,
            )[0]

        return flow_matching_loss(models, inputs, spec, predict)

    def tiny_pipeline(self) -> StableDiffusion3Pipeline:
        latent_channels = 16
        heads, head_dim = 2, 16
        t5_width = 3 * tiny.TEXT_WIDTH  # wider than both CLIPs side by side, so the zero padding shows
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_layers=3,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=t5_width,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=2 * tiny.TEXT_WIDTH,
            pos_embed_max_size=96,  # patches per side: 96 * 2 * 8 = 1536 px, beyond any bucket the tests use
            dual_attention_layers=(0,),  # as 3.5 medium's first blocks
            qk_norm="rms_norm",
        )
        tokenizer_3 = tiny.t5_tokenizer()
        t5 = tiny.t5_encoder(len(tokenizer_3), t5_width)
        tokenizer = tiny.clip_tokenizer()
        return StableDiffusion3Pipeline(
            vae=tiny.vae(
                latent_channels=latent_channels,
                use_quant_conv=False,
                use_post_quant_conv=False,
                shift_factor=0.0609,
                scaling_factor=1.5305,
            ),
            text_encoder=CLIPTextModelWithProjection(
                tiny.clip_text_config(len(tokenizer), projection_dim=tiny.TEXT_WIDTH)
            ),
            text_encoder_2=CLIPTextModelWithProjection(
                tiny.clip_text_config(len(tokenizer), projection_dim=tiny.TEXT_WIDTH)
            ),
            text_encoder_3=t5,
            tokenizer=tokenizer,
            tokenizer_2=tiny.clip_tokenizer(),
            tokenizer_3=tokenizer_3,
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )


FAMILY = StableDiffusion35()
