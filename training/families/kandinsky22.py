"""Kandinsky 2.2: LoRA on the decoder UNet, conditioned on CLIP image embeddings, as diffusers' own example
(examples/kandinsky2_2/text_to_image/train_text_to_image_lora_decoder.py) trains it.

Kandinsky 2.2 draws an image in two stages: the prior (a transformer over CLIP ViT-bigG's text embedding) turns the
prompt into a CLIP image embedding, and the decoder (a UNet over MoVQ latents) draws the image from that embedding.
Training the decoder needs no caption: each training image is encoded twice, by MoVQ into latents (unscaled, its
`encode(...).latents`) and by the prior's frozen CLIP image encoder into `image_embeds` (at CLIP's 224 px, through
the prior's image processor's resize, crop and normalisation). The UNet predicts noise and variance (8 channels);
its first 4 channels are the noise prediction, trained with the epsilon DDPM loss. The prior stays frozen and is
only run to embed captions: when sample images are drawn (KandinskyV22CombinedPipeline, which runs
KandinskyV22PriorPipeline on the prompt and KandinskyV22Pipeline on its embedding). So trainTextEncoder is refused.

Base model: `baseModel` names the decoder (kandinsky-community/kandinsky-2-2-decoder: unet/, movq/, scheduler/);
the prior comes from PRIOR_MODEL (kandinsky-community/kandinsky-2-2-prior, the prior the decoder's model card
names; read at its newest revision, `revision` pins the decoder). A local folder holds the decoder at the top and
the prior's pipeline folder under `prior/` (what `python -m training.tiny --family kandinsky22` writes). The
prior's components are named as diffusers' combined pipeline names them: `prior_<component>` is
`prior/<component>`. The prior transformer and its text encoder are read only when the spec asks for samples.

The LoRA: the attention projections (to_q, to_k, to_v, to_out.0) of every attention layer, the layers the example's
LoRAAttnAddedKVProcessor applies LoRA to. Kandinsky 2.2's pipelines have no `load_lora_weights`; the diffusers-format
file loads with `pipe.unet.load_lora_adapter(path, weight_name=..., prefix="unet")`, which reads the LoraConfig
(alpha included) from the file. ComfyUI does not run Kandinsky 2.2: no kohya file is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    DDPMScheduler,
    KandinskyV22CombinedPipeline,
    KandinskyV22Pipeline,
    PriorTransformer,
    UnCLIPScheduler,
    UNet2DConditionModel,
    VQModel,
)
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from transformers import (
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from contract.families import KANDINSKY22
from contract.spec import TrainSpec
from training import tiny
from training.families.base import ModelFamily, StepInputs, ddpm_loss
from training.families.sd15 import UNET_LORA_TARGETS

PRIOR_MODEL = "kandinsky-community/kandinsky-2-2-prior"
PRIOR_FOLDER = "prior"  # inside a local base model folder
PRIOR_PREFIX = "prior_"  # diffusers' combined pipeline's names for the prior's components
# The processor's `resample` the torch resize below stands for (PIL's BICUBIC), as the published one sets it
BICUBIC = 3


def prior_location(base_model: str) -> str:
    """Where the prior's pipeline folder is: `prior/` inside a local decoder folder, else the hub's prior."""
    local = Path(base_model)
    return str(local / PRIOR_FOLDER) if local.is_dir() else PRIOR_MODEL


def clip_pixels(processor: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the CLIP image encoder's input, as `processor` (a CLIPImageProcessor) prepares an
    image: the short side resized to its `size` (bicubic), the centre cut to its `crop_size`, then its mean and std.
    In torch on the images' device, so a batch (or the benchmark's meta tensors) never leaves it."""
    if processor.resample != BICUBIC:
        raise ValueError(f"image processor resamples with {processor.resample}; only bicubic ({BICUBIC}) is known")
    images = (pixels.float() + 1) / 2  # the processor's input: 0..255 rescaled to 0..1
    height, width = images.shape[-2:]
    short = processor.size["shortest_edge"]
    if height <= width:
        size = (short, int(short * width / height))
    else:
        size = (int(short * height / width), short)
    images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    crop_height, crop_width = processor.crop_size["height"], processor.crop_size["width"]
    top, left = (size[0] - crop_height) // 2, (size[1] - crop_width) // 2
    images = images[..., top : top + crop_height, left : left + crop_width]
    mean = torch.tensor(processor.image_mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


class Kandinsky22(ModelFamily):
    facts = KANDINSKY22
    components = {
        "unet": UNet2DConditionModel,
        "movq": VQModel,
        "scheduler": DDPMScheduler,
        "prior_image_encoder": CLIPVisionModelWithProjection,
        "prior_image_processor": CLIPImageProcessor,
    }
    image_conditioning_names = ("prior_image_encoder", "prior_image_processor")
    sample_components = {
        "prior_prior": PriorTransformer,
        "prior_text_encoder": CLIPTextModelWithProjection,
        "prior_tokenizer": CLIPTokenizer,
        "prior_scheduler": UnCLIPScheduler,
    }
    pipeline_class = KandinskyV22Pipeline  # the decoder's folder; samples run the combined pipeline
    sample_scheduler_class = DDPMScheduler  # what the decoder ships with and KandinskyV22Pipeline samples with
    lora_targets = UNET_LORA_TARGETS
    # writes `unet.`-prefixed peft keys with the LoraConfig in the metadata: what unet.load_lora_adapter reads
    lora_loader = StableDiffusionLoraLoaderMixin
    vae_name = "movq"

    def read_components(self, spec: TrainSpec, cache_dir: Path | None, weight_dtype: torch.dtype) -> dict[str, Any]:
        wanted = list(self.components)
        if spec.sample_every and spec.sample_prompts:
            wanted += list(self.sample_components)
        prior = prior_location(spec.base_model)
        components = {}
        for name in wanted:
            if name.startswith(PRIOR_PREFIX):
                where, subfolder, revision = prior, name.removeprefix(PRIOR_PREFIX), None
            else:
                where, subfolder, revision = spec.base_model, name, spec.revision
            components[name] = self.read_component(name, where, subfolder, revision, cache_dir, weight_dtype)
        return components

    def encode_text(self, encoders, token_ids, device):
        return {}  # the decoder is conditioned on the image embedding alone

    def latent_scale(self, vae_config: Any) -> float:
        # the example trains on movq.encode(...).latents as they are, and KandinskyV22Pipeline decodes them unscaled
        return 1.0

    def encode_image_conditioning(self, components, pixels, device):
        encoder = components["prior_image_encoder"]
        inputs = clip_pixels(components["prior_image_processor"], pixels.to(device))
        return {"image_embeds": encoder(inputs.to(dtype=encoder.dtype)).image_embeds}

    def loss(self, models, denoiser, inputs: StepInputs, spec) -> torch.Tensor:
        conditioning = {"added_cond_kwargs": {"image_embeds": inputs.image["image_embeds"]}}
        return ddpm_loss(models, denoiser, inputs, spec, conditioning)

    def sample_pipeline(self, models) -> KandinskyV22CombinedPipeline:
        if not models.sample_components:
            raise ValueError("Kandinsky 2.2 samples need the prior, read only when sampleEvery and samplePrompts are set")
        return KandinskyV22CombinedPipeline(
            unet=models.denoiser,
            movq=models.vae,
            scheduler=self.sample_scheduler_class.from_config(models.noise_scheduler.config),
            **models.image_conditioning,
            **models.sample_components,
        )

    def tiny_pipeline(self) -> KandinskyV22CombinedPipeline:
        width = tiny.TEXT_WIDTH  # CLIP's embedding width: the prior's, the image encoder's projection, the UNet's input
        tokenizer = tiny.clip_tokenizer()
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=8,  # noise and variance, as the real decoder
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            addition_embed_type="image",
            encoder_hid_dim=width,
            encoder_hid_dim_type="image_proj",
            cross_attention_dim=32,
            attention_head_dim=8,
            resnet_time_scale_shift="scale_shift",
            norm_num_groups=16,
        )
        # four blocks: MoVQ's 8x downscale, so latents and buckets have the real shapes
        movq = VQModel(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 32, 32, 32),  # MoVQ's spatial norm groups channels by 32
            layers_per_block=1,
            latent_channels=4,
            num_vq_embeddings=16,
            vq_embed_dim=4,
            norm_num_groups=8,
            norm_type="spatial",
        )
        prior = PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=width)
        with torch.no_grad():  # the real prior stores CLIP's embedding statistics here; zero std would erase its output
            prior.clip_std.fill_(1.0)
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=width,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                image_size=224,  # CLIP's input size: the processor crops to it
                patch_size=32,
                projection_dim=width,
            )
        )
        return KandinskyV22CombinedPipeline(
            unet=unet,
            scheduler=DDPMScheduler(
                num_train_timesteps=1000,
                beta_schedule="linear",
                beta_start=0.00085,
                beta_end=0.012,
                clip_sample=False,
                steps_offset=1,
            ),
            movq=movq,
            prior_prior=prior,
            prior_image_encoder=image_encoder,
            prior_text_encoder=CLIPTextModelWithProjection(tiny.clip_text_config(len(tokenizer), projection_dim=width)),
            prior_tokenizer=tokenizer,
            prior_scheduler=UnCLIPScheduler(
                variance_type="fixed_small_log", prediction_type="sample", clip_sample=True, clip_sample_range=10.0
            ),
            prior_image_processor=CLIPImageProcessor(
                size={"shortest_edge": 224},
                crop_size={"height": 224, "width": 224},
                resample=BICUBIC,
                image_mean=[0.48145466, 0.4578275, 0.40821073],
                image_std=[0.26862954, 0.26130258, 0.27577711],
            ),
        )

    def save_tiny_model(self, out: Path) -> None:
        """The decoder's folder at the top, the prior's pipeline folder under prior/ (see the module docstring)."""
        pipeline = self.tiny_pipeline()
        pipeline.decoder_pipe.save_pretrained(out, safe_serialization=True)
        pipeline.prior_pipe.save_pretrained(out / PRIOR_FOLDER, safe_serialization=True)

    def lora_file_usage(self, weight_name: str) -> str:
        return (
            f"`{weight_name}`: diffusers. Kandinsky 2.2's pipelines have no `load_lora_weights`; load it into the "
            "decoder's UNet: `pipe = AutoPipelineForText2Image.from_pretrained("
            '"kandinsky-community/kandinsky-2-2-decoder")`, then '
            f'`pipe.unet.load_lora_adapter(repo, weight_name="{weight_name}", prefix="unet")`. '
            "ComfyUI and A1111 do not run Kandinsky 2.2.\n"
        )


FAMILY = Kandinsky22()
