"""SD 2.x, as a user meets it: the loss of diffusers' train_text_to_image_lora.py for epsilon (2-base, 2.1-base) and
v-prediction (2, 2.1) models, samples through StableDiffusionPipeline, the LoRA files loading in a fresh
StableDiffusionPipeline with its own `load_lora_weights`, the kohya labels A1111 files the LoRA under, the refusals
of an SD 1.x model under sd2 and an SD 2.x model under sd15, and the example stack's memory fit and price."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors import safe_open

from bench.flops import META
from bench.models import architecture, build_components
from contract import memory
from contract.spec import TrainSpec
from contract.workspace import RunPaths
from infra.stack_files import load_stack_file
from tests.test_hostile_stacks import accepted, has, refused
from training import export
from training.families import StepInputs, family_for
from training.models import load_models

from .helpers import make_spec

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "stacks" / "Pulumi.sd2-4090.yaml"
CPU = torch.device("cpu")
GAMMA = 5.0
TIMESTEP_SEED = 0  # draws t = 44, 239, 933, 760 of 1000: SNR 22.7 and 2.24, 0.01, 0.05, on both sides of GAMMA
OUTPUT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def models_folder(tiny_model, tmp_path_factory):
    """{"epsilon": the tiny 2-base-like model, "v_prediction": the same with a v-prediction scheduler (2.1-like)}."""
    folder = tmp_path_factory.mktemp("sd2-v") / "tiny-sd2-v"
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model("sd2"))
    pipeline.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config, prediction_type="v_prediction")
    pipeline.save_pretrained(folder)
    return {"epsilon": tiny_model("sd2"), "v_prediction": folder}


def reference_loss(unet, latents, noise, embeds, prediction_type: str, gamma: float | None) -> torch.Tensor:
    """train_text_to_image_lora.py's loss, written out: scaled_linear betas (SD's 0.00085..0.012 over 1000 steps),
    x_t = sqrt(abar) x0 + sqrt(1 - abar) noise; target noise, or v = sqrt(abar) noise - sqrt(1 - abar) x0;
    Min-SNR-gamma weights min(snr, gamma) / snr (epsilon) or / (snr + 1) (v), snr = abar / (1 - abar)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=torch.Generator().manual_seed(TIMESTEP_SEED))
    signal = alpha_bar[timesteps].sqrt().view(-1, 1, 1, 1).float()
    sigma = (1 - alpha_bar[timesteps]).sqrt().view(-1, 1, 1, 1).float()
    noisy = signal * latents + sigma * noise
    target = noise if prediction_type == "epsilon" else signal * noise - sigma * latents
    prediction = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
    if gamma is None:
        return F.mse_loss(prediction, target)
    snr = (alpha_bar[timesteps] / (1 - alpha_bar[timesteps])).float()
    assert snr.min() < gamma < snr.max()  # the draw exercises both sides of the clamp
    weights = torch.minimum(snr, torch.full_like(snr, gamma))
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    return (F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()


@pytest.mark.parametrize("gamma", [None, GAMMA], ids=["plain", "min-snr"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_the_diffusers_examples_loss(models_folder, toy_images, prediction_type, gamma):
    spec = make_spec("sd2", models_folder[prediction_type], toy_images, minSnrGamma=gamma)
    models = load_models(spec, CPU)
    assert models.noise_scheduler.config.prediction_type == prediction_type  # read from the model's scheduler
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 4, 32, 32, generator=generator)
    noise = torch.randn(4, 4, 32, 32, generator=generator)
    with torch.no_grad():
        text = models.encode_text(models.tokenize(["a red circle", "a blue square", "a stripe", "sks"]))
        inputs = StepInputs(latents, text, noise, torch.zeros(4, 6), torch.Generator().manual_seed(TIMESTEP_SEED))
        loss = models.family.loss(models, models.denoiser, inputs, spec)
        expected = reference_loss(models.denoiser, latents, noise, text["prompt_embeds"], prediction_type, gamma)
        other = "v_prediction" if prediction_type == "epsilon" else "epsilon"
        wrong_target = reference_loss(models.denoiser, latents, noise, text["prompt_embeds"], other, gamma)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert abs(loss - wrong_target) > 1e-2 * loss  # the test tells the two targets apart


def test_samples_come_from_stable_diffusion_pipeline_with_the_models_prediction_type(models_folder, toy_images):
    spec = make_spec("sd2", models_folder["v_prediction"], toy_images)
    pipeline = load_models(spec, CPU).pipeline()  # what the training loop's samples are drawn with
    assert isinstance(pipeline, StableDiffusionPipeline) and isinstance(pipeline.scheduler, EulerDiscreteScheduler)
    # an epsilon sampler on a v model draws noise-soup images: the sampler keeps the model's prediction type
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    defaults = family_for("sd2").facts.sample
    assert (defaults.steps, defaults.guidance) == (50, 7.5)  # StableDiffusionPipeline's own defaults
    pipeline.set_progress_bar_config(disable=True)
    generated = pipeline(
        "a red circle, sks", num_inference_steps=2, guidance_scale=defaults.guidance, height=256, width=192,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert generated.images[0].size == (192, 256)


# ---------------------------------------------------------------------------------------------------------
# the LoRA files in a fresh StableDiffusionPipeline
# ---------------------------------------------------------------------------------------------------------


def outputs(unet, text_encoder) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sample = torch.randn(1, 4, 16, 16, generator=generator)
        context = torch.randn(1, 5, unet.config.cross_attention_dim, generator=generator)
        return {
            "unet": unet(sample, 10, encoder_hidden_states=context).sample,
            "text_encoder": text_encoder(torch.tensor([[0, 5, 17, 99, 1]])).last_hidden_state,
        }


@pytest.mark.parametrize(
    ("prediction_type", "version", "architecture_label"),
    [("epsilon", "sd_v2", "stable-diffusion-v2-512/lora"), ("v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora")],
)
def test_lora_files_load_in_stable_diffusion_pipeline_and_reproduce_the_trained_outputs(
    models_folder, toy_images, tmp_path, prediction_type, version, architecture_label
):
    folder = models_folder[prediction_type]
    spec = make_spec("sd2", folder, toy_images, trainTextEncoder=True, rank=4, alpha=8)
    models = load_models(spec, CPU)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as if trained: peft starts lora_B at zero
        for module in (models.denoiser, models.text_encoders["text_encoder"]):
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    models.denoiser.eval()
    models.text_encoders["text_encoder"].eval()
    files = export.export_lora(
        models.denoiser, models.text_encoders, spec, RunPaths(tmp_path, "run"), "hash", "sd2",
        prediction_type=models.noise_scheduler.config.prediction_type, environ={},
    )  # fmt: skip
    expected = outputs(models.denoiser, models.text_encoders["text_encoder"])
    base = StableDiffusionPipeline.from_pretrained(folder)
    untrained = outputs(base.unet, base.text_encoder)
    for name in expected:
        assert (expected[name] - untrained[name]).abs().max() > 100 * OUTPUT_TOLERANCE, name

    for kind in ("diffusers", "kohya"):
        pipeline = StableDiffusionPipeline.from_pretrained(folder)
        pipeline.load_lora_weights(str(files[kind].parent), weight_name=files[kind].name)
        loaded = outputs(pipeline.unet, pipeline.text_encoder)
        for name, output in expected.items():
            difference = (loaded[name] - output).abs().max().item()
            assert difference < OUTPUT_TOLERANCE, f"{kind} file, {name}: max abs difference {difference:.2e}"

    with safe_open(str(files["kohya"]), framework="pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == (version, "True")
    assert metadata["modelspec.architecture"] == architecture_label
    # sd-scripts' SD 2.x UNet keeps diffusers' block names; its text encoder prefix is lora_te
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys


# ---------------------------------------------------------------------------------------------------------
# the other SD family's model is refused: by hub id at make check, by the UNet's text width at load
# ---------------------------------------------------------------------------------------------------------


def stack_config(**train) -> dict:
    config = yaml.safe_load(STACK.read_text())["config"]
    config["lorastack:train"].update(train)
    return config


@pytest.mark.parametrize(
    ("family", "base_model", "wanted"),
    [
        ("sd15", "stabilityai/stable-diffusion-2-1", "sd2"),
        ("sd15", "stabilityai/stable-diffusion-2-base", "sd2"),
        ("sd15", "StabilityAI/Stable-Diffusion-2-1-Base", "sd2"),
        ("sd2", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15"),
        ("sd2", "runwayml/stable-diffusion-v1-5", "sd15"),
    ],
)
def test_make_check_refuses_a_known_base_model_under_the_other_family(tmp_path, capsys, family, base_model, wanted):
    lines = refused(tmp_path, capsys, stack_config(family=family, baseModel=base_model))
    assert has(lines, "lorastack:train", f"{base_model} is a base model of family {wanted}, not {family}: "
                                         f"set family: {wanted}"), lines


def test_make_check_accepts_each_sd2_base_model_under_sd2(tmp_path, capsys):
    for base_model in ("stabilityai/stable-diffusion-2-base", "stabilityai/stable-diffusion-2-1-base",
                       "stabilityai/stable-diffusion-2", "stabilityai/stable-diffusion-2-1", "someone/sd2-fine-tune"):
        accepted(tmp_path, capsys, stack_config(baseModel=base_model))


@pytest.mark.parametrize(("family", "other"), [("sd15", "sd2"), ("sd2", "sd15")])
def test_the_trainer_refuses_the_other_familys_tiny_model(tiny_model, toy_images, family, other):
    width = family_for(other).unet_text_widths[-1]
    with pytest.raises(ValueError, match=rf"attends to {width}-wide text states, as family {other}'s models do "
                                         rf".*: set family: {other}"):
        load_models(make_spec(family, tiny_model(other), toy_images), CPU)


@pytest.mark.parametrize(("family", "other", "width"), [("sd15", "sd2", 1024), ("sd2", "sd15", 768)])
def test_the_trainer_refuses_a_full_size_unet_of_the_other_family_from_an_unlisted_path(family, other, width):
    """A fine-tune in a local folder passes make check (no family lists it); the UNet's text width gives it away."""
    spec = TrainSpec(family=family, base_model="/models/my-fine-tune", dataset={"source": "/data"}, resolution=512)

    def other_familys_model(spec, cache_dir, weight_dtype):
        return build_components(architecture(other, "full"), META, weight_dtype)

    with pytest.raises(ValueError, match=rf"/models/my-fine-tune: its UNet attends to {width}-wide text states, as "
                                         rf"family {other}'s models do \({family}'s: .*\): set family: {other}"):
        load_models(spec, CPU, source=other_familys_model)


# ---------------------------------------------------------------------------------------------------------
# memory and price of the example stack
# ---------------------------------------------------------------------------------------------------------


def write_stack(tmp_path, config: dict, name: str):
    path = tmp_path / f"Pulumi.{name}.yaml"
    path.write_text(yaml.safe_dump({"config": config}, sort_keys=False))
    return path


def test_example_stack_fits_its_gpu_and_the_same_settings_on_a_smaller_card_are_refused(tmp_path, capsys):
    loaded = load_stack_file(STACK)
    plan = memory.plan(loaded.train, 24)
    assert not plan.gradient_checkpointing and plan.total_gib <= 24 * 0.92  # batch 2 at 768 without checkpointing

    small = stack_config(gradientCheckpointing="off")
    small["lorastack:runpod"]["gpuType"] = "NVIDIA RTX A4000"  # 16 GB
    lines = refused(tmp_path, capsys, small)
    assert has(lines, "needs about 18 GiB (weights 1.6, activations 14.4 for batch 2 at 768px, checkpointing off) "
                      "but a 16 GB card leaves about 15"), lines
    small["lorastack:train"]["gradientCheckpointing"] = "auto"  # `auto` turns checkpointing on, and it fits
    small["lorastack:limits"]["maxHours"] = 2  # a slower card, and checkpointing's recomputation
    accepted(tmp_path, capsys, small)


def test_example_stack_is_priced_from_the_768_v_figures(tmp_path):
    estimate = load_stack_file(STACK).cost_estimate()
    variant = family_for("sd2").facts.variants[0]
    assert estimate.seconds_per_step == pytest.approx(variant.seconds_per_step["NVIDIA GeForce RTX 4090"] * 2)
    assert estimate.hours >= 1000 * estimate.seconds_per_step / 3600
    assert estimate.usd == pytest.approx(estimate.hours * estimate.usd_per_hour) and 0.2 < estimate.usd < 0.5

    base = copy.deepcopy(stack_config(baseModel="stabilityai/stable-diffusion-2-1-base", resolution=512))
    at_512 = load_stack_file(write_stack(tmp_path, base, "sd2-base")).cost_estimate()
    assert at_512.seconds_per_step == pytest.approx(family_for("sd2").facts.seconds_per_step["NVIDIA GeForce RTX 4090"] * 2)
    assert at_512.usd < estimate.usd
