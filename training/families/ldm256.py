"""LDM text-to-image 256 (CompVis/ldm-text2im-large-256): LDMBert text encoder, KL-f8 autoencoder, UNet, DDPM.

diffusers' `LDMTextToImagePipeline` names its components `bert` and `vqvae` (an AutoencoderKL in this repo despite
the name) and has no LoRA loader: the LoRA file is read by the UNet's own `load_lora_adapter` (README).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, LDMTextToImagePipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
from transformers import BertTokenizer

from contract.families import LDM256
from training import tiny
from training.families.base import ModelFamily, StepInputs, ddpm_loss
from training.families.sd15 import UNET_LORA_TARGETS

# LDMTextToImagePipeline pads every prompt to 77 tokens (LDMBert's position table) whatever the tokenizer declares.
LDMBERT_MAX_LENGTH = 77
UNET_LORA_PREFIX = "unet"  # the key prefix of the UNet's layers in our file, and `load_lora_adapter`'s `prefix`


class LatentDiffusion256(ModelFamily):
    facts = LDM256
    components = {
        "unet": UNet2DConditionModel,
        "vqvae": AutoencoderKL,
        "bert": LDMBertModel,
        "tokenizer": BertTokenizer,
        "scheduler": DDPMScheduler,  # the repo ships DDIM for sampling; training noise is DDPM on its beta schedule
    }
    pipeline_class = LDMTextToImagePipeline
    sample_scheduler_class = DDIMScheduler  # the repo's own sampler
    lora_targets = UNET_LORA_TARGETS
    # The pipeline has no LoRA loader. This mixin's save writes the UNet's layers under `unet.`, the prefix the
    # UNet's `load_lora_adapter(..., prefix="unet")` reads, with the LoraConfig (alpha) in the file's metadata.
    lora_loader = StableDiffusionLoraLoaderMixin
    vae_name = "vqvae"

    @property
    def text_encoder_names(self) -> list[str]:
        return ["bert"]

    def lora_file_usage(self, weight_name: str) -> str:
        return (
            f"`{weight_name}`: the one file, for diffusers: LDMTextToImagePipeline has no `load_lora_weights`, its "
            f'UNet loads it: `pipeline.unet.load_lora_adapter(repo, weight_name="{weight_name}", '
            f'prefix="{UNET_LORA_PREFIX}")`. ComfyUI, A1111 and Forge do not run this model.\n'
        )

    def max_token_length(self, name: str, tokenizer: Any) -> int:
        return LDMBERT_MAX_LENGTH

    def encode_text(self, encoders, token_ids, device):
        # as LDMTextToImagePipeline.__call__: LDMBert's last hidden state, no attention mask
        return {"prompt_embeds": encoders["bert"](token_ids["tokenizer"].to(device))[0]}

    def loss(self, models, denoiser, inputs: StepInputs, spec) -> torch.Tensor:
        return ddpm_loss(models, denoiser, inputs, spec)

    def tiny_pipeline(self) -> LDMTextToImagePipeline:
        tokenizer = tiny.bert_tokenizer()
        bert = LDMBertModel(
            LDMBertConfig(
                vocab_size=len(tokenizer),
                d_model=tiny.TEXT_WIDTH,
                encoder_layers=2,
                encoder_attention_heads=2,
                head_dim=16,
                encoder_ffn_dim=37,
                max_position_embeddings=LDMBERT_MAX_LENGTH,
            )
        )
        # LDM's layout in miniature: attention in the high-resolution blocks, none in the lowest one
        unet = UNet2DConditionModel(
            sample_size=32,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=tiny.TEXT_WIDTH,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            clip_sample=False,
            set_alpha_to_one=False,
        )
        return LDMTextToImagePipeline(
            vqvae=tiny.vae(scaling_factor=0.18215),
            bert=bert,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )


FAMILY = LatentDiffusion256()
