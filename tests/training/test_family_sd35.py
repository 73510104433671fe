"""Stable Diffusion 3.5: the loss is diffusers' train_dreambooth_lora_sd3.py's (its timestep densities, loss
weightings and preconditioning, written out here from the script), FLUX honours the same keys, the text
conditioning is StableDiffusion3Pipeline's, samples and the exported LoRA go through the real pipeline, and the
example stack fits its GPU and is priced."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from peft.tuners.lora import LoraLayer

from contract import memory
from contract.families import SD35
from contract.spec import SpecError, TrainSpec, parse_spec
from contract.workspace import RunPaths
from infra.stack_files import parse_stack, read_stack_document, stack_file
from training.export import export_trained
from training.families import StepInputs
from training.loop import train
from training.models import load_models

from .helpers import make_spec

CAPTIONS = ["a red circle", "a blue stripe on a long green field"]


def flow_reference_loss(predict, scheduler, latents, noise, generator, options) -> torch.Tensor:
    """train_dreambooth_lora_sd3.py's step, from the script and diffusers.training_utils, independently of
    training/families: u by the scheme's density, the timestep at index u * N, its sigma looked up in the
    schedule (the script's get_sigmas), noisy latents, optional preconditioning, the weighted squared error
    averaged per image and then over the batch."""
    scheme = options["weightingScheme"]
    size = latents.shape[0]
    if scheme == "logit_normal":
        u = torch.sigmoid(
            torch.normal(mean=options["logitMean"], std=options["logitStd"], size=(size,), generator=generator)
        )
    else:
        u = torch.rand(size=(size,), generator=generator)
        if scheme == "mode":
            u = 1 - u - options["modeScale"] * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
    positions = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[positions].view(size, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    prediction = predict(noisy, timesteps)
    if options["preconditionOutputs"]:
        prediction, target = prediction * (-sigmas) + noisy, latents
    else:
        target = noise - latents
    if scheme == "sigma_sqrt":
        weighting = sigmas**-2.0
    elif scheme == "cosmap":
        weighting = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    else:
        weighting = torch.ones_like(sigmas)
    return torch.mean((weighting * (prediction - target) ** 2).reshape(size, -1), 1).mean()


def sd3_predict(transformer, text):
    def predict(noisy, timesteps):
        return transformer(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text["prompt_embeds"],
            pooled_projections=text["pooled_prompt_embeds"], return_dict=False,
        )[0]  # fmt: skip

    return predict


def flux_predict(transformer, text):
    """train_dreambooth_lora_flux.py's call: packed 2x2 latents, position ids, guidance 3.5, timesteps / 1000."""

    def predict(noisy, timesteps):
        size, channels, height, width = noisy.shape
        output = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, size, channels, height, width),
            timestep=timesteps / 1000,
            guidance=torch.full((size,), 3.5),
            pooled_projections=text["pooled_prompt_embeds"],
            encoder_hidden_states=text["prompt_embeds"],
            txt_ids=torch.zeros(text["prompt_embeds"].shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(size, height // 2, width // 2, "cpu", torch.float32),
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(output, height * 8, width * 8, 8)

    return predict


SD3_SCRIPT_DEFAULTS = {
    "weightingScheme": "logit_normal", "logitMean": 0.0, "logitStd": 1.0, "modeScale": 1.29, "preconditionOutputs": True,
}  # fmt: skip
FLUX_SCRIPT_DEFAULTS = {**SD3_SCRIPT_DEFAULTS, "weightingScheme": "none", "preconditionOutputs": False}
LOSS_CASES = {
    "sd35-script-defaults": ("sd35", {}),
    "sd35-logit-normal-shifted": ("sd35", {"logitMean": 0.8, "logitStd": 0.5}),
    "sd35-mode": ("sd35", {"weightingScheme": "mode", "modeScale": 1.0, "preconditionOutputs": False}),
    "sd35-sigma-sqrt": ("sd35", {"weightingScheme": "sigma_sqrt"}),
    "sd35-cosmap": ("sd35", {"weightingScheme": "cosmap", "preconditionOutputs": False}),
    "flux-script-defaults": ("flux", {}),
    "flux-logit-normal": ("flux", {"weightingScheme": "logit_normal"}),
    "flux-cosmap-preconditioned": ("flux", {"weightingScheme": "cosmap", "preconditionOutputs": True}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_loss_is_the_example_scripts_on_fixed_latents_noise_and_timesteps(tiny_model, toy_images, case):
    family, keys = LOSS_CASES[case]
    spec = make_spec(family, tiny_model(family), toy_images, **keys)
    options = {**(SD3_SCRIPT_DEFAULTS if family == "sd35" else FLUX_SCRIPT_DEFAULTS), **keys}
    models = load_models(spec, torch.device("cpu"))
    with torch.no_grad():  # a trained-looking adapter, so the LoRA takes part in the prediction
        for name, parameter in models.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    fixed = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16 if family == "sd35" else 4, 32, 24, generator=fixed)
    noise = torch.randn(latents.shape, generator=fixed)
    with torch.no_grad():
        text = models.encode_text(models.tokenize(CAPTIONS))
        inputs = StepInputs(latents, text, noise, torch.zeros(2, 6), torch.Generator().manual_seed(11))
        loss = models.family.loss(models, models.denoiser, inputs, spec)
        predict = (sd3_predict if family == "sd35" else flux_predict)(models.denoiser, text)
        expected = flow_reference_loss(
            predict, models.noise_scheduler, latents, noise, torch.Generator().manual_seed(11), options
        )
        # the draw matters: another seed's timesteps give another loss
        other = flow_reference_loss(
            predict, models.noise_scheduler, latents, noise, torch.Generator().manual_seed(12), options
        )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(other.item() - expected.item()) > 1e-4


def test_the_families_defaults_are_their_example_scripts(tiny_model, toy_images):
    for family, defaults in (("sd35", SD3_SCRIPT_DEFAULTS), ("flux", FLUX_SCRIPT_DEFAULTS)):
        settings = make_spec(family, tiny_model(family), toy_images).flow_matching
        assert (settings.weighting_scheme, settings.logit_mean, settings.logit_std, settings.mode_scale,
                settings.precondition_outputs) == tuple(defaults.values())  # fmt: skip


# ------------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_ddpm_families_refuse_the_flow_matching_keys_by_name(family):
    raw = {"family": family, "baseModel": "x/y", "dataset": {"source": "/data"},
           "weightingScheme": "logit_normal", "preconditionOutputs": False}  # fmt: skip
    with pytest.raises(SpecError) as refused:
        parse_spec(raw, "stack.yaml")
    message = str(refused.value)
    assert "weightingScheme, preconditionOutputs: only for flow-matching families (flux, sd35)" in message
    assert f"{family} is a DDPM model" in message and "minSnrGamma" in message


def test_weighting_keys_are_checked():
    raw = {"family": "sd35", "baseModel": "x/y", "dataset": {"source": "/data"}}
    with pytest.raises(SpecError, match="train.weightingScheme = 'logit'.*'sigma_sqrt', 'logit_normal', 'mode'"):
        parse_spec({**raw, "weightingScheme": "logit"}, "stack.yaml")
    with pytest.raises(SpecError, match=r"train.modeScale = 1.8: must be between -1 and 2/\(pi-2\) = 1.752"):
        parse_spec({**raw, "modeScale": 1.8}, "stack.yaml")  # the mode density leaves [0, 1] beyond 2 / (pi - 2)
    with pytest.raises(SpecError, match="train.logitStd = 0"):
        parse_spec({**raw, "logitStd": 0}, "stack.yaml")
    assert parse_spec({**raw, "weightingScheme": "mode", "modeScale": -1}, "stack.yaml").flow_matching.mode_scale == -1


# ------------------------------------------------------------------------------ text, samples, export


def test_text_conditioning_is_what_the_sd3_pipeline_encodes(tiny_model, toy_images):
    models = load_models(make_spec("sd35", tiny_model("sd35"), toy_images), torch.device("cpu"))
    with torch.no_grad():
        ours = models.encode_text(models.tokenize(CAPTIONS))
        pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_model("sd35"))
        length = pipeline.tokenizer_3.model_max_length  # the tiny T5's 32; the real one is cut to the script's 77
        embeds, _, pooled, _ = pipeline.encode_prompt(
            CAPTIONS, None, None, do_classifier_free_guidance=False, max_sequence_length=length
        )
    assert ours["prompt_embeds"].shape == (2, 77 + length, 96)  # the CLIPs' 77 tokens (side by side), then T5's
    assert ours["pooled_prompt_embeds"].shape == (2, 64)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, atol=1e-6, rtol=1e-5)
    assert not ours["prompt_embeds"][:, :77, 64:].any()  # the CLIP part zero-padded to T5's width


def test_samples_generate_through_the_sd3_pipeline_with_its_defaults(tiny_model, toy_images):
    defaults = inspect.signature(StableDiffusion3Pipeline.__call__).parameters
    assert SD35.sample.steps == defaults["num_inference_steps"].default
    assert SD35.sample.guidance == defaults["guidance_scale"].default

    models = load_models(make_spec("sd35", tiny_model("sd35"), toy_images), torch.device("cpu"))
    pipeline = models.pipeline()
    assert isinstance(pipeline, StableDiffusion3Pipeline) and pipeline.transformer is models.denoiser
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a red circle", num_inference_steps=2, height=256, width=192, generator=torch.Generator().manual_seed(0),
        max_sequence_length=32,
    ).images[0]  # fmt: skip
    assert image.size == (192, 256)


def test_the_example_targets_adapt_the_joint_attention_only(tiny_model, toy_images):
    models = load_models(make_spec("sd35", tiny_model("sd35"), toy_images), torch.device("cpu"))
    adapted = {name for name, module in models.denoiser.named_modules() if isinstance(module, LoraLayer)}
    assert "transformer_blocks.0.attn.to_q" in adapted and "transformer_blocks.1.attn.add_k_proj" in adapted
    assert models.denoiser.transformer_blocks[0].attn2 is not None  # the tiny model has medium's second attention
    assert not [name for name in adapted if ".attn2." in name]  # which the example's targets leave alone
    assert "transformer_blocks.2.attn.to_add_out" not in adapted  # the last block's context stream ends early


def test_exported_lora_loads_in_the_sd3_pipeline_and_reproduces_the_trained_transformer(
    tiny_model, toy_images, workspace
):
    spec = make_spec("sd35", tiny_model("sd35"), toy_images, steps=2, learningRate=1e-2, alpha=8)
    result = train(spec, RunPaths(workspace, "run"))
    files = export_trained(result.state, environ={})
    assert set(files) == {"diffusers", "model_card"}  # no kohya file: ComfyUI reads the diffusers one

    trained = result.state.models.denoiser.eval()
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_model("sd35"))
    before = copy.deepcopy(pipeline.transformer)
    pipeline.load_lora_weights(files["diffusers"].parent, weight_name=files["diffusers"].name)

    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 32, 32, generator=generator),
        "encoder_hidden_states": torch.randn(1, 20, 96, generator=generator),
        "pooled_projections": torch.randn(1, 64, generator=generator),
        "timestep": torch.tensor([500.0]),
    }
    with torch.no_grad():
        expected, loaded, untrained = (model(**inputs).sample for model in (trained, pipeline.transformer, before))
    assert (expected - untrained).abs().max() > 1e-3  # the LoRA changes the output
    assert (loaded - expected).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------ memory, cost


def example_stack(**train) -> dict:
    raw = read_stack_document(stack_file("sd35-4090"))
    raw["lorastack:train"] = {**raw["lorastack:train"], **train}
    return raw


def test_the_example_stack_fits_its_4090_and_a_16_gb_card_is_refused_with_the_figures():
    config = parse_stack(example_stack(), "sd35-4090")
    planned = memory.plan(config.train, 24)
    assert not planned.gradient_checkpointing and planned.total_gib < 24 * 0.92  # about 15 GiB

    refusal = (r"cannot fit runpod.gpuType 'NVIDIA RTX A4000': needs about 15 GiB \(weights 4\.6, activations 9\.0 "
               r"for batch 1 at 1024px, checkpointing off\) but a 16 GB card leaves about 15")
    with pytest.raises(SpecError, match=refusal):
        raw = example_stack(gradientCheckpointing="off")
        raw["lorastack:runpod"] = {**raw["lorastack:runpod"], "gpuType": "NVIDIA RTX A4000"}
        parse_stack(raw, "sd35-4090")


def test_large_needs_its_own_memory_and_checkpointing_on_a_4090():
    large = parse_stack(example_stack(baseModel="stabilityai/stable-diffusion-3.5-large"), "sd35-large")
    assert memory.plan(large.train, 24).gradient_checkpointing  # auto turns it on for the 8.1B transformer
    with pytest.raises(SpecError, match=r"needs about 32 GiB \(weights 25\.7, .*checkpointing on\)"):
        parse_stack(example_stack(baseModel="stabilityai/stable-diffusion-3.5-large", cacheLatents=False), "x")


def test_the_example_stack_is_priced_from_the_family_estimate():
    medium = parse_stack(example_stack(), "sd35-4090").cost_estimate()
    assert medium.seconds_per_step == pytest.approx(0.65) and medium.usd < 1
    large = parse_stack(example_stack(baseModel="stabilityai/stable-diffusion-3.5-large-turbo"), "x").cost_estimate()
    assert large.seconds_per_step == pytest.approx(2.0) and large.usd > 2 * medium.usd


def test_trainspec_round_trips_the_weighting_keys():
    spec = TrainSpec.model_validate({"family": "sd35", "baseModel": "x/y", "dataset": {"source": "/data"},
                                     "weightingScheme": "cosmap", "preconditionOutputs": False})  # fmt: skip
    assert TrainSpec.model_validate_json(spec.to_env_json()) == spec
    assert '"weightingScheme":"cosmap"' in spec.to_env_json()
