"""LDM text-to-image 256 (CompVis/ldm-text2im-large-256) as a user meets it: the loss is diffusers' DDPM LoRA
formula, the text conditioning and the samples are LDMTextToImagePipeline's own, the LoRA file loads with the
diffusers call the README gives, and the 8 GB example stack fits its card and is priced.

diffusers has no training example for this model, so the loss is checked against the formula of diffusers'
train_text_to_image_lora.py applied to it: Gaussian noise, timesteps uniform in [0, num_train_timesteps),
noisy = sqrt(alphas_cumprod[t]) * latents + sqrt(1 - alphas_cumprod[t]) * noise (DDPMScheduler.add_noise), the
epsilon target, MSE; with --snr_gamma, each sample's MSE weighted by min(SNR, gamma) / SNR. The reference below is
written from that formula with the beta schedule computed from the scheduler config, not through our code.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDIMScheduler, LDMTextToImagePipeline
from peft.tuners.lora import LoraLayer

from contract import memory
from contract.families import LDM256
from contract.spec import TrainSpec
from contract.workspace import RunPaths
from infra import pricing
from infra.stack_files import STACKS_DIR, StackError, load_stack, parse_stack
from training import export
from training.families import StepInputs, family_for
from training.loop import build_state, generate_samples
from training.models import load_models

from .helpers import make_spec

FAMILY = family_for("ldm256")
RANK, ALPHA = 4, 8
OUTPUT_TOLERANCE = 1e-5
STACK = "ldm256-local"


def reference_ddpm_loss(unet, config, latents, noise, timesteps, context, snr_gamma=None) -> torch.Tensor:
    """train_text_to_image_lora.py's loss, with the scaled_linear schedule written out from the config."""
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)[timesteps].view(-1, 1, 1, 1)
    noisy = alphas_cumprod.sqrt() * latents + (1.0 - alphas_cumprod).sqrt() * noise
    prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), noise.float())
    snr = (alphas_cumprod / (1.0 - alphas_cumprod)).flatten()
    weights = torch.minimum(snr, torch.full_like(snr, snr_gamma)) / snr
    per_sample = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("ldm256")


def trained_adapter(unet: torch.nn.Module, seed: int) -> None:
    """lora_B as if trained (peft starts it at zero, where the LoRA changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_loss_is_the_ddpm_epsilon_formula_of_diffusers_lora_example(model, toy_images, snr_gamma):
    spec = make_spec("ldm256", model, toy_images, minSnrGamma=snr_gamma)
    models = load_models(spec, torch.device("cpu"))
    assert type(models.noise_scheduler).__name__ == "DDPMScheduler"  # from the repo's DDIM config, as sd15
    assert models.noise_scheduler.config.prediction_type == "epsilon"
    trained_adapter(models.denoiser, seed=3)
    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 32, 32), torch.randn(3, 4, 32, 32)
    text = models.encode_text(models.tokenize(["a red circle", "a blue square", "sks"]))
    seed = 11

    loss = FAMILY.loss(models, models.denoiser, StepInputs(latents, text, noise, torch.zeros(3, 6),
                                                           torch.Generator().manual_seed(seed)), spec)
    # train_text_to_image_lora.py draws timesteps with torch.randint; here from the same seeded stream
    timesteps = torch.randint(0, 1000, (3,), generator=torch.Generator().manual_seed(seed))
    expected = reference_ddpm_loss(
        models.denoiser, models.noise_scheduler.config, latents, noise, timesteps, text["prompt_embeds"], snr_gamma
    )
    assert loss.item() > 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_text_conditioning_is_what_the_pipeline_feeds_its_unet(model, toy_images):
    """LDMTextToImagePipeline pads to 77 tokens and conditions on LDMBert's last hidden state: the cached embeddings
    must be exactly what the pipeline's UNet receives for the same prompt."""
    pipeline = LDMTextToImagePipeline.from_pretrained(model)
    received = []
    pipeline.unet.register_forward_pre_hook(
        lambda _, args, kwargs: received.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    prompt = "A photo of sks, on a beach!"
    pipeline(prompt, num_inference_steps=1, guidance_scale=1.0, output_type="np")

    models = load_models(make_spec("ldm256", model, toy_images), torch.device("cpu"))
    ids = models.tokenize([prompt])
    assert ids["tokenizer"].shape == (1, 77)
    with torch.no_grad():
        ours = models.encode_text(ids)["prompt_embeds"]
    torch.testing.assert_close(ours, received[0], rtol=0, atol=0)


def test_samples_come_from_the_ldm_pipeline_with_its_steps_and_guidance(model, toy_images, workspace):
    spec = make_spec("ldm256", model, toy_images, samplePrompts=["a red circle"], sampleEvery=1)
    state = build_state(spec, RunPaths(workspace, "samples"))
    pipeline = state.models.pipeline()
    assert isinstance(pipeline, LDMTextToImagePipeline) and isinstance(pipeline.scheduler, DDIMScheduler)
    assert pipeline.vqvae is state.models.vae and pipeline.bert is state.models.text_encoders["bert"]

    unet_batches = []
    hook = state.models.denoiser.register_forward_pre_hook(lambda _, args: unet_batches.append(args[0].shape[0]))
    images = generate_samples(state)
    hook.remove()
    assert [image.size for image in images] == [(256, 256)]
    # 50 denoising steps, each on the unconditional and the prompt's latents (guidance 6.0 is on)
    assert (LDM256.sample.steps, LDM256.sample.guidance) == (50, 6.0)
    assert unet_batches == [2] * 50


def test_the_lora_file_loads_into_the_pipelines_unet_and_reproduces_the_adapter(model, toy_images, workspace):
    spec = make_spec("ldm256", model, toy_images, rank=RANK, alpha=ALPHA)
    state = build_state(spec, RunPaths(workspace, "export"))
    unet = state.models.denoiser
    trained_adapter(unet, seed=5)
    assert {module.scaling["default"] for module in unet.modules() if isinstance(module, LoraLayer)} == {ALPHA / RANK}
    files = export.export_trained(state, environ={})
    assert set(files) == {"diffusers", "model_card"}  # no kohya file: ComfyUI and A1111 do not run this model

    # the README's two lines
    pipeline = LDMTextToImagePipeline.from_pretrained(model)
    base_unet = copy.deepcopy(pipeline.unet)
    pipeline.unet.load_lora_adapter(
        str(files["diffusers"].parent), weight_name="pytorch_lora_weights.safetensors", prefix="unet"
    )

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 32, 32, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        expected = unet(sample, 500, encoder_hidden_states=context).sample
        loaded = pipeline.unet(sample, 500, encoder_hidden_states=context).sample
        untrained = base_unet(sample, 500, encoder_hidden_states=context).sample
    assert (expected - untrained).abs().max() > 100 * OUTPUT_TOLERANCE  # the LoRA matters
    difference = (loaded - expected).abs().max().item()
    assert difference < OUTPUT_TOLERANCE, f"max abs difference {difference:.2e} (a lost alpha shows as 2x the delta)"

    card = files["model_card"].read_text()
    usage = 'pipeline.unet.load_lora_adapter(repo, weight_name="pytorch_lora_weights.safetensors", prefix="unet")'
    assert usage in card and "pipeline.load_lora_weights" not in card


def test_train_text_encoder_is_refused_for_ldm256():
    with pytest.raises(ValueError, match="trainTextEncoder is not supported for ldm256"):
        TrainSpec.model_validate(
            {"family": "ldm256", "baseModel": "CompVis/ldm-text2im-large-256", "dataset": {"source": "hf://u/d"},
             "trainTextEncoder": True}
        )


def test_a_stack_without_resolution_trains_at_256():
    spec = TrainSpec.model_validate(
        {"family": "ldm256", "baseModel": "CompVis/ldm-text2im-large-256", "dataset": {"source": "hf://u/d"}}
    )
    assert spec.resolution == 256


def test_the_8gb_stack_fits_from_the_footprint_and_a_smaller_card_is_refused():
    config = load_stack(STACK)
    assert config.local.memory_gb == 8 and config.train.family == "ldm256"
    spec = config.train
    plan = memory.plan(spec, config.local.memory_gb)
    footprint = LDM256.memory
    assert plan.weights_gib == pytest.approx(footprint.denoiser_params_b * 1e9 * 2 / 2**30)  # latents cached
    assert plan.activations_gib == pytest.approx(footprint.activations_gib * spec.batch_size)  # 256 px: reference
    assert not plan.gradient_checkpointing and plan.total_gib <= 8 * 0.92

    fits, reason = memory.fits(spec, 3)
    assert not fits
    assert "needs about 4 GiB (weights 1.6, activations 0.8 for batch 4 at 256px, checkpointing on)" in reason
    assert "a 3 GB card leaves about 3" in reason

    raw = yaml.safe_load((STACKS_DIR / f"Pulumi.{STACK}.yaml").read_text())["config"]
    raw["lorastack:train"].update({"batchSize": 16, "gradientCheckpointing": "off"})
    with pytest.raises(StackError) as refused:
        parse_stack(raw, f"stacks/Pulumi.{STACK}.yaml")
    assert any(
        "cannot fit local.gpuType 'NVIDIA GeForce RTX 3070'" in line and "activations 12.8 for batch 16 at 256px" in line
        for line in refused.value.problems
    ), refused.value.problems


def test_the_stack_is_priced_in_minutes():
    config = load_stack(STACK)
    estimate = config.cost_estimate()
    # no figure for a 3070: the family's first GPU scaled by relative speed, times the batch
    per_image = LDM256.seconds_per_step["NVIDIA GeForce RTX 3090"] * pricing.RELATIVE_SPEED["NVIDIA GeForce RTX 3090"]
    per_image /= pricing.RELATIVE_SPEED["NVIDIA GeForce RTX 3070"]
    assert estimate.seconds_per_step == pytest.approx(per_image * config.train.batch_size)
    training_minutes = estimate.seconds_per_step * config.train.steps / 60
    assert training_minutes < 15
    assert estimate.usd == pytest.approx(0.08 * estimate.hours) and estimate.usd < config.limits.max_cost_usd
