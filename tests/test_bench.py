"""The benchmark harness on CPU: FLOP counting checked against analytic counts and against the real step,
the published configs' parameter counts, the largest-batch search, the smoke run end to end, and the
cost table reading measured rows."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import __main__ as bench_main
from bench import harness, report
from bench.flops import META, count_step_flops
from bench.models import CONFIG_DIR, architecture, build_components, in_memory_source
from contract.families import FAMILY_NAMES, SD35
from contract.workspace import RunPaths
from infra import pricing
from training import tiny
from training.families import family_for
from training.loop import build_state, next_micro_batches, train_step

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------ counting method


def _counted(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[int, int]:
    with FlopCounterMode(display=False) as forward:
        loss = model(inputs).sum()
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return forward.get_total_flops(), backward.get_total_flops()


def test_flop_counter_counts_what_lora_training_computes_on_a_conv_linear_pair():
    batch, channels, out_channels, side, kernel, features = 2, 3, 8, 6, 3, 5
    conv_flops = 2 * batch * out_channels * side * side * channels * kernel * kernel  # padding 1: same size
    linear_flops = 2 * batch * (out_channels * side * side) * features

    def pair() -> torch.nn.Sequential:
        return torch.nn.Sequential(
            torch.nn.Conv2d(channels, out_channels, kernel, padding=1, bias=False),
            torch.nn.Flatten(),
            torch.nn.Linear(out_channels * side * side, features, bias=False),
        )

    inputs = torch.randn(batch, channels, side, side)
    # Frozen conv, trained linear: the backward is the linear's weight gradient alone; the conv's output
    # needs no gradient, so neither of the conv's gradients is computed.
    model = pair()
    model[0].requires_grad_(False)
    assert _counted(model, inputs) == (conv_flops + linear_flops, linear_flops)
    # Trained conv, frozen linear (a LoRA layer before a frozen one): the linear passes the activation
    # gradient back (1x its forward) and the conv computes its weight gradient (1x), not its input gradient.
    model = pair()
    model[2].requires_grad_(False)
    assert _counted(model, inputs) == (conv_flops + linear_flops, linear_flops + conv_flops)


def test_published_configs_build_the_published_parameter_counts():
    expected = {
        "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
        "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
        "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
        "flux": {
            "transformer": 11_901_408_320, "vae": 83_819_683,
            "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
        },
        # SD 3.5 medium: 2.24B parameters plus its 384^2 x 1536 positional table (a buffer), 2.47B in the
        # published checkpoint ("2.5B"); CLIP-L with its projection, CLIP-G, T5-XXL's encoder
        "sd35": {
            "transformer": 2_243_171_520, "vae": 83_819_683, "text_encoder": 123_650_304,
            "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656,
        },
        # LDMBert counts its unused to_logits head (39M) too, as the repo's checkpoint holds it
        "ldm256": {"unet": 872_300_484, "vqvae": 83_653_863, "bert": 581_994_042},
    }
    for family, counts in expected.items():
        components = build_components(architecture(family, "full"), META, torch.bfloat16)
        built = {name: sum(p.numel() for p in components[name].parameters()) for name in counts}
        assert built == counts, family
        vae = components[family_for(family).vae_name]
        assert vae.dtype == (torch.float32 if family == "sdxl" else torch.bfloat16)
        if family == "flux":
            assert components["tokenizer_2"].model_max_length == 512  # FLUX.1-dev's T5 context
    sd35 = build_components(architecture("sd35", "full"), META, torch.bfloat16)["transformer"]
    assert sd35.pos_embed.pos_embed.numel() == 384 * 384 * 1536 and len(sd35.config.dual_attention_layers) == 13


def test_sd35_large_config_builds_the_published_size():
    """8.1B (Stability's figure): the large transformer of bench/configs/sd35.json, with its positional table."""
    raw = json.loads((CONFIG_DIR / "sd35.json").read_text())["_large_transformer"]
    with torch.device(META):
        transformer = SD3Transformer2DModel.from_config(raw)
    size = sum(p.numel() for p in transformer.parameters()) + transformer.pos_embed.pos_embed.numel()
    assert size == 8_146_280_768
    assert size / 1e9 == pytest.approx(SD35.variants[0].memory.denoiser_params_b, abs=0.01)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    tiny.make_dataset(work / "images", harness.DATASET_IMAGES)
    return harness.Setup(
        device=torch.device("cpu"),
        architectures={family: architecture(family, "tiny") for family in FAMILY_NAMES},
        work=work,
        images=work / "images",
        steps=1,
        warmup=0,
        peak_tflops=None,
        resolution=256,
    )


@pytest.mark.parametrize("stack_name", harness.STACKS)
def test_meta_count_equals_the_real_steps_count(setup, stack_name):
    """The meta-device count (what MFU uses) is what the trainer's real step computes, op for op."""
    stack = harness.load_bench_stack(stack_name)
    off = harness.Variant("checkpointing-off", "", {"gradient_checkpointing": "off"})
    spec = harness.run_spec(setup, stack, off, batch_size=2)
    source = in_memory_source(setup.architectures[spec.family], setup.device)
    state = build_state(spec, RunPaths(setup.work, "flops"), source=source)
    # the meta device has no fused attention kernel: on both sides SDPA is its two matmuls
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as real:
        train_step(state, next_micro_batches(state))
    counted = count_step_flops(setup.architectures[spec.family], spec, batch_size=2)
    assert counted.total == real.get_total_flops() > 0
    assert 0 < counted.lora_forward < counted.forward


# --------------------------------------------------------------------------------------------- search


@pytest.mark.parametrize(("largest", "limit"), [(5, 64), (0, 64), (64, 64), (1, 1), (7, 10), (10, 10)])
def test_largest_fitting_finds_the_boundary(largest, limit):
    tried = []

    def fits(batch_size: int) -> bool:
        tried.append(batch_size)
        return batch_size <= largest

    assert harness.largest_fitting(fits, limit) == largest
    assert max(tried) <= limit and len(tried) == len(set(tried))


# ------------------------------------------------------------------------------------- the smoke run


def test_smoke_run_writes_rows_and_leaves_the_readme_without_gpu_results(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(report.README, readme)
    exit_code = bench_main.main([
        "--device", "cpu", "--stacks", "sd15-3090", "--variants", "baseline,checkpointing-on,sdpa-math",
        "--no-per-image-flops", "--steps", "1", "--warmup", "0", "--results", str(tmp_path), "--readme", str(readme),
    ])
    assert exit_code == 0
    document = json.loads((tmp_path / "cpu-tiny.json").read_text())
    assert document["environment"]["device"] == "cpu" and document["environment"]["size"] == "tiny"
    rows = {(row["variant"], row["batch_size"]): row for row in document["rows"]}
    # baseline at batch 1 and at the stack's batch 4; the search doubled to the CPU limit of 2
    assert set(rows) == {
        ("baseline", 1), ("baseline", 4), ("checkpointing-on", 1), ("checkpointing-on", 2), ("sdpa-math", 4)
    }
    assert all(row["status"] == "ok" and row["seconds_per_step"] > 0 for row in rows.values())
    assert rows[("checkpointing-on", 2)]["largest_batch"] and rows[("checkpointing-on", 1)]["gradient_checkpointing"]
    assert rows[("baseline", 4)]["flops_per_step"] == 4 * rows[("baseline", 1)]["flops_per_step"]
    batch_4 = rows[("baseline", 4)]
    assert batch_4["images_per_second"] == pytest.approx(4 / batch_4["seconds_per_step"], rel=1e-3)
    assert "No GPU measurements yet" in readme.read_text()


def test_a_run_cut_short_keeps_its_rows_and_a_retry_measures_only_what_is_unfinished(tmp_path, monkeypatch):
    # bench/gpu.sh runs each stack under a time limit: what was measured before the limit must be in the file
    args = ["--device", "cpu", "--variants", "baseline,sdpa-math", "--no-search", "--no-per-image-flops",
            "--steps", "1", "--warmup", "0", "--skip-completed", "--results", str(tmp_path),
            "--readme", str(tmp_path / "README.md")]
    shutil.copy(report.README, tmp_path / "README.md")
    measure, calls = harness.measure, []

    def stopped_at_the_third(*given, **options):
        calls.append(given[1].name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what the time limit's signal does to the process
        return measure(*given, **options)

    monkeypatch.setattr(harness, "measure", stopped_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        bench_main.main(["--stacks", "sd15-3090", *args])
    path = tmp_path / "cpu-tiny.json"
    document = json.loads(path.read_text())
    assert [(row["variant"], row["batch_size"]) for row in document["rows"]] == [("baseline", 1), ("baseline", 4)]
    assert document["completed_stacks"] == []

    monkeypatch.setattr(harness, "measure", measure)
    assert bench_main.main(["--stacks", "sd15-3090", *args]) == 0
    assert json.loads(path.read_text())["completed_stacks"] == ["sd15-3090"]
    calls.clear()
    monkeypatch.setattr(harness, "measure", stopped_at_the_third)
    assert bench_main.main(["--stacks", "sd15-3090", *args]) == 0  # the retry: nothing left to measure
    assert calls == [] and len(json.loads(path.read_text())["rows"]) == 3


def test_counting_some_stacks_keeps_the_other_stacks_flop_counts(tmp_path):
    path = tmp_path / report.FLOPS_FILE
    path.write_text(json.dumps({"counts": [{"stack": "sdxl-4090", "n": 1}, {"stack": "sd15-3090", "n": 2}]}))
    merged = report.merged_flops(path, [{"stack": "sd15-3090", "n": 3}])
    assert merged == [{"stack": "sdxl-4090", "n": 1}, {"stack": "sd15-3090", "n": 3}]


# -------------------------------------------------------------------------------------- results files


def _gpu_row(stack: str, family: str, variant: str, batch_size: int, seconds: float, **extra) -> dict:
    return {
        "stack": stack, "family": family, "variant": variant, "batch_size": batch_size, "gradient_accumulation": 1,
        "resolution": 1024, "status": "ok", "seconds_per_step": seconds, "images_per_second": batch_size / seconds,
        "peak_memory_gib": 20.0, "flops_per_step": int(14.2e12 * batch_size), "mfu": 0.3,
        "gradient_checkpointing": False, **extra,
    }


H100 = {"device": "cuda", "size": "full", "gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.2, "driver": "x",
        "cuda": "12.8", "torch": "2.13.0", "diffusers": "0.42.1", "peft": "0.21.2", "date": "2026-01-01"}


def test_a_partial_run_replaces_only_its_rows_and_the_checks_are_judged_again(tmp_path):
    path = tmp_path / "nvidia-h100-80gb-hbm3.json"
    report.write_results(path, H100, [_gpu_row("sdxl-4090", "sdxl", "baseline", 1, 0.5, peak_memory_gib=23.0)])
    report.write_results(path, H100, [
        _gpu_row("sdxl-4090", "sdxl", "baseline", 1, 0.4, peak_memory_gib=18.5),
        _gpu_row("sdxl-4090", "sdxl", "compile", 1, 0.3, mfu=0.45),
    ])
    document = json.loads(path.read_text())
    assert [(r["variant"], r["seconds_per_step"]) for r in document["rows"]] == [("baseline", 0.4), ("compile", 0.3)]
    assert [(c["met"], c["value"]) for c in document["checks"]] == [(True, 18.5), (True, "45.0% (compile, batch 1)")]
    readme = tmp_path / "README.md"
    shutil.copy(report.README, readme)
    report.render_readme(tmp_path, readme)
    text = readme.read_text()
    assert "### NVIDIA H100 80GB HBM3" in text and "| sdxl-4090 | compile | 1 | off | 0.300 |" in text
    assert "No GPU measurements yet" not in text


def test_pricing_uses_measured_rows_of_the_stacks_settings_only(tmp_path):
    (tmp_path / "nvidia-h100-80gb-hbm3.json").write_text(json.dumps({"environment": H100, "rows": [
        _gpu_row("sdxl-4090", "sdxl", "baseline", 1, 0.31),
        _gpu_row("sdxl-4090", "sdxl", "baseline", 4, 1.0),
        _gpu_row("sdxl-4090", "sdxl", "compile", 1, 0.2),
    ]}))
    tiny_run = {**H100, "size": "tiny"}
    (tmp_path / "nvidia-h100-80gb-hbm3-tiny.json").write_text(json.dumps({"environment": tiny_run, "rows": [
        _gpu_row("flux-h100", "flux", "baseline", 1, 0.01),
    ]}))
    (tmp_path / "flops.json").write_text(json.dumps({"counts": []}))
    gpu = "NVIDIA H100 80GB HBM3"
    assert pricing.seconds_per_step("sdxl", gpu, 1024, 1, tmp_path) == 0.31
    assert pricing.seconds_per_step("sdxl", gpu, 1024, 4, tmp_path) == 1.0  # measured at that batch size
    assert pricing.seconds_per_step("sdxl", gpu, 1024, 2, tmp_path) == pytest.approx(0.62)  # scaled from batch 1
    # the tiny smoke run is no measurement: FLUX keeps its estimate
    assert pricing.seconds_per_step("flux", gpu, 1024, 1, tmp_path) == pricing.SECONDS_PER_STEP[("flux", gpu, 1024)]


def test_an_attention_kernel_that_cannot_run_is_recorded_not_fatal(setup):
    # CPU has no memory-efficient kernel: the same refusal a GPU kernel gives for shapes it cannot take
    stack = harness.load_bench_stack("flux-h100")
    only_efficient = harness.Variant("sdpa-efficient", "", attention=("EFFICIENT_ATTENTION",))
    row = harness.measure(setup, stack, only_efficient, batch_size=1)
    assert row["status"] == "no such attention kernel for these shapes"
