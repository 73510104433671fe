"""Kandinsky 2.2: the decoder's loss against diffusers' example (train_text_to_image_lora_decoder.py), the image
conditioning against the prior's real CLIPImageProcessor, cached and uncached steps alike, samples through the real
prior + decoder pipelines, and the LoRA file loaded with diffusers' plain `unet.load_lora_adapter`."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import KandinskyV22CombinedPipeline, KandinskyV22Pipeline, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image
from transformers import CLIPImageProcessor

from contract import memory
from contract.families import SampleDefaults, facts_for
from contract.spec import TrainSpec
from contract.workspace import RunPaths
from infra import pricing
from infra.stack_files import load_stack
from training import export
from training.families import StepInputs, family_for
from training.families.kandinsky22 import PRIOR_FOLDER, PRIOR_MODEL, clip_pixels, prior_location
from training.loop import build_state, compute_loss, generate_samples, next_micro_batches
from training.models import load_models

from .helpers import make_spec

FAMILY = "kandinsky22"
RANK, ALPHA = 4, 8
OUTPUT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model(FAMILY)


def fixed_inputs(models, size: int = 2, side: int = 8):
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(size, 4, side, side, generator=generator)
    noise = torch.randn(size, 4, side, side, generator=generator)
    width = models.denoiser.config.encoder_hid_dim
    image_embeds = torch.randn(size, width, generator=generator)
    return latents, noise, image_embeds


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_is_the_examples_decoder_loss(folder, toy_images, gamma):
    spec = make_spec(FAMILY, folder, toy_images, minSnrGamma=gamma)
    models = load_models(spec, torch.device("cpu"))
    latents, noise, image_embeds = fixed_inputs(models)
    inputs = StepInputs(latents, {}, noise, torch.zeros(2, 6), torch.Generator().manual_seed(11), {"image_embeds": image_embeds})
    with torch.no_grad():
        ours = family_for(FAMILY).loss(models, models.denoiser, inputs, spec)

    # the example's step: timesteps uniform over the schedule, DDPM noise, the UNet on no text and the image
    # embedding, the first 4 (of 8) output channels against the noise
    scheduler, unet = models.noise_scheduler, models.denoiser
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2,), generator=torch.Generator().manual_seed(11))
    alphas = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
    with torch.no_grad():
        prediction = unet(noisy, timesteps, None, added_cond_kwargs={"image_embeds": image_embeds}).sample[:, :4]
    if gamma is None:
        expected = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
    else:
        snr = scheduler.alphas_cumprod[timesteps] / (1 - scheduler.alphas_cumprod[timesteps])
        weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
        per_image = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
        expected = (per_image * weights).mean()
    assert unet.config.out_channels == 8 and prediction.shape == latents.shape
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)


def test_image_conditioning_is_the_prior_image_processors_and_encoders(folder, toy_images):
    spec = make_spec(FAMILY, folder, toy_images)
    models = load_models(spec, torch.device("cpu"))
    processor = CLIPImageProcessor.from_pretrained(folder / PRIOR_FOLDER, subfolder="image_processor")
    for path in sorted(toy_images.glob("*.png"))[:3]:  # square, landscape and portrait
        array = np.array(Image.open(path).convert("RGB"))
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1
        reference = processor([Image.fromarray(array)], return_tensors="pt").pixel_values
        ours = clip_pixels(models.image_conditioning["prior_image_processor"], pixels)
        assert ours.shape == reference.shape == (1, 3, 224, 224)
        # PIL's bicubic on 8-bit pixels against torch's on floats: about one 8-bit level apart at the shapes' edges
        # (1/255/0.27 = 0.015); a crop one pixel off is 0.006 on average
        difference = (ours - reference).abs()
        assert difference.mean() < 1e-3 and difference.max() < 0.03, path.name

    embeds = models.encode_image_conditioning(pixels)["image_embeds"]
    with torch.no_grad():
        expected = models.image_conditioning["prior_image_encoder"](reference).image_embeds
    assert embeds.shape == (1, models.denoiser.config.encoder_hid_dim)
    assert (embeds - expected).abs().max() < 0.05 * expected.abs().max()


def test_cached_and_uncached_steps_compute_the_same_loss(folder, toy_images, workspace):
    """MoVQ encodes without a posterior draw, so the cached features (latents and image_embeds) and those encoded in
    the step itself are the same, and so is the first step's loss."""
    losses = []
    for cache in (True, False):
        spec = make_spec(FAMILY, folder, toy_images, cacheLatents=cache)
        state = build_state(spec, RunPaths(workspace, f"cache-{cache}"))
        batch = next_micro_batches(state)[0]
        assert (batch.image is not None) == cache and batch.text is None
        with torch.no_grad():
            losses.append(compute_loss(state, batch).item())
    assert math.isfinite(losses[0]) and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_samples_come_from_the_prior_and_decoder_pipelines(folder, toy_images, workspace, monkeypatch):
    prompts = ["a red circle", "a blue square"]
    spec = make_spec(FAMILY, folder, toy_images, sampleEvery=2, samplePrompts=prompts)
    state = build_state(spec, RunPaths(workspace, "samples"))
    family = family_for(FAMILY)
    # the trainer's own call with 3 decoder steps, not the pipeline's 100 (minutes on a shared CPU)
    monkeypatch.setattr(type(family), "facts", dataclasses.replace(family.facts, sample=SampleDefaults(3, 4.0)))
    assert set(state.models.sample_components) == set(family.sample_components)
    pipeline = state.models.pipeline()
    assert isinstance(pipeline, KandinskyV22CombinedPipeline) and pipeline.unet is state.models.denoiser
    images = generate_samples(state)
    assert [image.size for image in images] == [(spec.resolution, spec.resolution)] * 2
    assert np.asarray(images[0]).std() > 0 and images[0].tobytes() != images[1].tobytes()  # each prompt its own


def test_the_prior_is_read_only_for_samples_and_from_where_the_decoder_is(folder, toy_images):
    family = family_for(FAMILY)
    components = family.read_components(make_spec(FAMILY, folder, toy_images), None, torch.float32)
    assert set(components) == set(family.components)  # no prior transformer or text encoder without samples
    assert prior_location(str(folder)) == str(folder / PRIOR_FOLDER)
    assert prior_location("kandinsky-community/kandinsky-2-2-decoder") == PRIOR_MODEL


def test_train_text_encoder_is_refused():
    with pytest.raises(ValueError, match="trainTextEncoder is not supported for kandinsky22"):
        TrainSpec.model_validate(
            {"family": FAMILY, "baseModel": "kandinsky-community/kandinsky-2-2-decoder",
             "dataset": {"source": "hf://u/d"}, "trainTextEncoder": True}
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# the LoRA file, loaded as the example's README (and diffusers 0.42) tells users to
# ---------------------------------------------------------------------------------------------------------


def unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    image_embeds = torch.randn(1, unet.config.encoder_hid_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, None, added_cond_kwargs={"image_embeds": image_embeds}).sample


def test_the_lora_file_loads_into_a_fresh_decoder_with_load_lora_adapter(folder, tmp_path):
    family = family_for(FAMILY)
    base = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    trained = copy.deepcopy(base)
    trained.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=family.lora_targets))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as if trained: peft starts lora_B at zero
        for name, parameter in trained.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    spec = TrainSpec(family=FAMILY, base_model=str(folder), dataset={"source": "/data"}, resolution=512, steps=10,
                     rank=RANK, alpha=ALPHA)  # fmt: skip
    files = export.export_lora(trained, None, spec, RunPaths(tmp_path, "run"), "h", FAMILY, prediction_type="epsilon",
                               environ={})  # fmt: skip
    assert set(files) == {"diffusers", "model_card"}  # ComfyUI runs no Kandinsky: no kohya file
    assert not hasattr(KandinskyV22Pipeline, "load_lora_weights")  # why the file goes through the UNet's loader

    expected, untrained = unet_output(trained), unet_output(base)
    assert (expected - untrained).abs().max() > 100 * OUTPUT_TOLERANCE  # a lost alpha (scale 1, not 2) would show
    fresh = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    fresh.load_lora_adapter(str(files["diffusers"].parent), weight_name=files["diffusers"].name, prefix="unet")
    difference = (unet_output(fresh) - expected).abs().max().item()
    assert difference < OUTPUT_TOLERANCE, f"max abs difference {difference:.2e}"
    card = files["model_card"].read_text()
    assert 'pipe.unet.load_lora_adapter(repo, weight_name="pytorch_lora_weights.safetensors", prefix="unet")' in card
    assert "ComfyUI and A1111 do not run Kandinsky 2.2" in card


# ---------------------------------------------------------------------------------------------------------
# memory, time and cost of the example stack
# ---------------------------------------------------------------------------------------------------------


def test_the_example_stack_fits_its_4090_and_is_refused_on_a_smaller_card():
    stack = load_stack("kandinsky22-4090")  # validated: the fit rule and the limits against the estimate
    assert stack.train.family == FAMILY and stack.train.resolution == facts_for(FAMILY).native_resolution
    fits, _ = memory.fits(stack.train, 24)
    assert fits and not memory.plan(stack.train, 24).gradient_checkpointing  # 2 images at 768 px, no recomputation
    fits, reason = memory.fits(stack.train, 6)
    assert not fits
    assert "needs about 7 GiB (weights 2.3, activations 3.0 for batch 2 at 768px, checkpointing on)" in reason
    assert "a 6 GB card leaves about 6" in reason
    # not caching keeps MoVQ and the 1.8B CLIP image encoder on the GPU: 3.6 GiB more in bf16
    uncached = stack.train.model_copy(update={"cache_latents": False})
    extra = memory.estimate(uncached, False).weights_gib - memory.estimate(stack.train, False).weights_gib
    assert extra == pytest.approx(1.91e9 * 2 / 2**30)


def test_the_example_stack_is_priced_from_the_estimates():
    stack = load_stack("kandinsky22-4090")
    per_step = pricing.seconds_per_step(FAMILY, "NVIDIA GeForce RTX 4090", 768, 2)
    assert per_step == pytest.approx(2 * facts_for(FAMILY).seconds_per_step["NVIDIA GeForce RTX 4090"])
    estimate = stack.cost_estimate()
    assert estimate.seconds_per_step == pytest.approx(per_step)
    assert 0 < estimate.usd < stack.limits.max_cost_usd and estimate.hours < stack.limits.max_hours
