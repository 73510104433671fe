"""Stable Diffusion 2.x: SD 1.x's pipeline (training/families/sd15.py) with OpenCLIP ViT-H/14's text tower, linear
attention projections and 64-channel heads. 2-base and 2.1-base predict epsilon at 512; 2 and 2.1 predict v at
768 (the scheduler config says which, and the loss and the kohya labels follow it)."""

from __future__ import annotations

from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from contract.families import SD2
from training import tiny
from training.families.sd15 import StableDiffusion

# The tiny model's text width: not the tiny SD 1.x model's, so the two families' tiny UNets are told apart as
# the real ones are (OpenCLIP ViT-H's 1024 against CLIP ViT-L's 768)
TINY_TEXT_WIDTH = 2 * tiny.TEXT_WIDTH


class StableDiffusion2(StableDiffusion):
    facts = SD2
    unet_text_widths = (1024, TINY_TEXT_WIDTH)

    def tiny_unet(self) -> UNet2DConditionModel:
        # SD 2.x's shape in miniature: attention in every block but the last, a head count per block (diffusers'
        # attention_head_dim, as the published config spells it), linear projections, attention upcast to fp32
        return UNet2DConditionModel(
            sample_size=32,
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_TEXT_WIDTH,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            upcast_attention=True,
            norm_num_groups=16,
        )

    def tiny_text_encoder(self, vocab_size: int) -> CLIPTextModel:
        # OpenCLIP's text tower as converted: plain gelu (CLIP ViT-L's is quick_gelu)
        return CLIPTextModel(tiny.clip_text_config(vocab_size, hidden_size=TINY_TEXT_WIDTH, hidden_act="gelu"))


FAMILY = StableDiffusion2()
