"""The tiny models load in diffusers' own pipelines and in the trainer's loader."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from training.models import load_models

from .helpers import make_spec

PIPELINES = {
    "sd15": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
    "flux": FluxPipeline,
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_tiny_model_generates_with_the_diffusers_pipeline(tiny_model, family):
    pipeline = PIPELINES[family].from_pretrained(tiny_model(family))
    pipeline.set_progress_bar_config(disable=True)
    extra = {"max_sequence_length": 32} if family == "flux" else {}
    image = pipeline(
        "a red circle", num_inference_steps=2, height=256, width=192, generator=torch.Generator().manual_seed(0),
        **extra,
    ).images[0]  # fmt: skip
    assert image.size == (192, 256)


@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_loader_adds_fp32_lora_to_a_frozen_model(tiny_model, toy_images, family):
    spec = make_spec(family, tiny_model(family), toy_images)
    models = load_models(spec, torch.device("cpu"))
    trainable = models.trainable_parameters()
    assert trainable and all("lora" in name for name, p in models.denoiser.named_parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in trainable)
    assert not any(p.requires_grad for p in models.vae.parameters())
    assert not any(p.requires_grad for e in models.text_encoders.values() for p in e.parameters())
    assert not models.gradient_checkpointing  # `auto` on CPU: off

    text = models.encode_text(models.tokenize(["a red circle", "a blue square"]))
    if family == "sdxl":
        assert text["prompt_embeds"].shape == (2, 77, 64) and text["pooled_prompt_embeds"].shape == (2, 32)
    elif family == "flux":
        assert text["prompt_embeds"].shape == (2, 32, 32) and text["pooled_prompt_embeds"].shape == (2, 32)
    else:
        assert text["prompt_embeds"].shape == (2, 77, models.denoiser.config.cross_attention_dim)
    latents = models.encode_images(torch.zeros(1, 3, 256, 192), torch.Generator().manual_seed(0))
    assert latents.shape == (1, 4, 32, 24)


def test_text_encoder_lora_and_gradient_checkpointing_on_request(tiny_model, toy_images):
    spec = make_spec("sdxl", tiny_model("sdxl"), toy_images, trainTextEncoder=True, gradientCheckpointing="on")
    models = load_models(spec, torch.device("cpu"))
    assert models.gradient_checkpointing and models.denoiser.is_gradient_checkpointing
    assert set(models.trained_modules()) == {"unet", "text_encoder", "text_encoder_2"}
    for encoder in models.text_encoders.values():
        assert any(p.requires_grad for p in encoder.parameters())
