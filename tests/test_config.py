"""Stack validation: every bad value fails before anything is billed, naming the file, the key and the rule."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from contract.naming import run_id
from contract.spec import SpecError, TrainSpec, spec_from_environment
from infra.stack_files import STACKS_DIR, StackError, load_stack, parse_stack

ROOT = Path(__file__).resolve().parent.parent
SDXL = yaml.safe_load((STACKS_DIR / "Pulumi.sdxl-4090.yaml").read_text())["config"]
SOURCE = "stacks/Pulumi.sdxl-4090.yaml"


def edited(**changes: object) -> dict:
    """The sdxl-4090 stack with dotted-path edits: `{"train.learningRate": 0.5}`; None deletes the key."""
    config = copy.deepcopy(SDXL)
    for path, value in changes.items():
        top, *rest = path.split(".")
        key = f"lorastack:{top}"
        if not rest:
            if value is None:
                config.pop(key)
            else:
                config[key] = value
            continue
        node = config[key]
        for part in rest[:-1]:
            node = node[part]
        if value is None:
            node.pop(rest[-1])
        else:
            node[rest[-1]] = value
    return config


# the sdxl stack turned into a FLUX one: without its DDPM-only keys (minSnrGamma, noiseOffset), which FLUX refuses
AS_FLUX = {"train.family": "flux", "train.minSnrGamma": None, "train.noiseOffset": None}


def problems(config: dict) -> list[str]:
    with pytest.raises(StackError) as caught:
        parse_stack(config, SOURCE)
    return caught.value.problems


def test_every_committed_stack_is_valid():
    names = sorted(path.name.removeprefix("Pulumi.").removesuffix(".yaml") for path in STACKS_DIR.glob("Pulumi.*.yaml"))
    assert {"sdxl-4090", "sd15-3090", "flux-h100"} <= set(names)
    for name in names:
        load_stack(name)


def test_the_example_stack_reads_as_written():
    config = load_stack("sdxl-4090")
    assert config.runpod.gpu_type == "NVIDIA GeForce RTX 4090"
    assert config.runpod.volume.keep_on_destroy is True
    assert config.image.ref == "ghcr.io/lorastack/trainer:0.1.0"
    assert config.train.family == "sdxl" and config.train.lora_alpha == 16
    assert config.run_limits().usd_per_hour == pytest.approx(0.59)


BAD_INPUTS = [
    ({"train.learningRate": 0.5}, "lorastack:train.learningRate = 0.5", "less than or equal to 0.01"),
    ({"train.family": "sd3"}, "lorastack:train.family = 'sd3'",
     "'sdxl', 'sd15', 'flux', 'sd2', 'sd35', 'kandinsky22' or 'ldm256'"),
    ({"train.resolution": 1000}, "lorastack:train", "multiple of 64"),
    ({"train.rank": 0}, "lorastack:train.rank = 0", "greater than or equal to 1"),
    ({"train.stesp": 10}, "lorastack:train.stesp", "unknown key"),
    ({"train.baseModel": None}, "lorastack:train.baseModel", "required key is missing"),
    ({"train.lrScheduler": "cosine_restarts"}, "lorastack:train.lrScheduler", "'constant'"),
    ({"train.warmupSteps": 5000}, "lorastack:train", "warmupSteps (5000) must be less than steps (1500)"),
    ({"runpod.gpuType": "RTX 4090"}, "lorastack:runpod.gpuType = 'RTX 4090'", "NVIDIA GeForce RTX 4090"),
    ({"runpod.dataCenter": "MARS-1"}, "lorastack:runpod.dataCenter = 'MARS-1'", "EU-RO-1"),
    ({"runpod.cloud": "COMMUNITY"}, "lorastack:runpod", "network volume needs cloud: SECURE"),
    ({"runpod.dataCenter": None}, "lorastack:runpod", "pinned to one data center"),
    ({"runpod.volume.sizeGb": 5}, "lorastack:runpod.volume.sizeGb = 5", "greater than or equal to 10"),
    ({"image.version": "latest"}, "lorastack:image.version = 'latest'", "pinned semver"),
    ({"image": "ghcr.io/lorastack/trainer"}, "lorastack:image.version = 'latest'", "pinned semver"),
    ({"image.digest": "sha256:abc"}, "lorastack:image.digest", "64 hex digits"),
    ({"limits.maxCostUsd": -1}, "lorastack:limits.maxCostUsd = -1", "greater than 0"),
    ({"limits": None}, "lorastack:limits", "required key is missing"),
    ({"provider": "azure"}, "lorastack:provider = 'azure'", "'runpod', 'replicate'"),  # a provider no backend claims
    (
        {"train.batchSize": 2, "train.gradientCheckpointing": "off"},
        "lorastack:",
        "cannot fit runpod.gpuType 'NVIDIA GeForce RTX 4090'",
    ),
    ({"train.family": "flux", "train.baseModel": "black-forest-labs/FLUX.1-dev"}, "lorastack:", "cannot fit"),
    ({"train.sampleEvery": 10, "train.samplePrompts": []}, "lorastack:train", "samplePrompts is empty"),
]


@pytest.mark.parametrize(("changes", "key", "allowed"), BAD_INPUTS, ids=[str(c) for c, _, _ in BAD_INPUTS])
def test_bad_input_names_file_key_and_rule(changes, key, allowed):
    config = edited(**changes)
    lines = problems(config)
    assert any(line.startswith(f"{SOURCE}: {key}") and allowed in line for line in lines), lines


def test_all_problems_are_reported_at_once():
    lines = problems(edited(**{"train.learningRate": 1, "train.rank": 0, "image.version": "latest"}))
    assert len(lines) == 3


def test_plain_text_secret_is_refused():
    config = edited()
    config["lorastack:hfToken"] = "hf_notreallyatoken"
    lines = problems(config)
    assert lines == [
        f"{SOURCE}: lorastack:hfToken: a secret stored in plain text; run `pulumi config set --secret hfToken ...` "
        "(or export HF_TOKEN) and remove the plain value"
    ]
    assert "hf_notreallyatoken" not in "\n".join(lines)


def test_encrypted_secret_and_foreign_keys_are_accepted():
    config = edited()
    config["lorastack:hfToken"] = {"secure": "v1:AAAA"}
    config["aws:region"] = "eu-west-1"
    assert parse_stack(config, SOURCE).train.family == "sdxl"


def test_yaml_on_off_means_on_off():
    config = parse_stack(edited(**{"train.gradientCheckpointing": True}), SOURCE)
    assert config.train.gradient_checkpointing == "on"


def test_replicate_idle_deployment_needs_a_budget():
    replicate = {
        "owner": "me", "model": "lora", "hardware": "gpu-h100",
        "deployment": {"hardware": "gpu-l40s", "minInstances": 1, "maxInstances": 2},
    }
    config = edited(provider="replicate", runpod=None, replicate=replicate, **AS_FLUX)
    lines = problems(config)
    assert any("minInstances = 1 keeps gpu-l40s running" in line and "monthlyBudgetUsd" in line for line in lines), lines


def test_spec_is_validated_the_same_way_in_the_pod():
    spec = load_stack("sdxl-4090").train
    assert spec_from_environment({"LORASTACK_SPEC": spec.to_env_json()}) == spec
    bad = json.loads(spec.to_env_json()) | {"learningRate": 0.5}
    with pytest.raises(SpecError) as caught:
        spec_from_environment({"LORASTACK_SPEC": json.dumps(bad)})
    assert caught.value.problems == ["$LORASTACK_SPEC: learningRate = 0.5: Input should be less than or equal to 0.01"]


def test_a_changed_spec_is_a_new_run():
    spec = load_stack("sdxl-4090").train
    changed = TrainSpec.model_validate(json.loads(spec.to_env_json()) | {"steps": 2000})
    assert run_id("sdxl-4090", spec) == run_id("sdxl-4090", TrainSpec.model_validate_json(spec.to_env_json()))
    assert run_id("sdxl-4090", spec) != run_id("sdxl-4090", changed)


def test_a_setting_a_later_version_adds_unset_keeps_the_run():
    # upgrading lorastack must not move a running stack to a new run (a replaced pod, a restart from step 0)
    class Upgraded(TrainSpec):
        some_later_setting: float | None = None

    spec = load_stack("sdxl-4090").train
    upgraded = Upgraded.model_validate(json.loads(spec.to_env_json()))
    assert upgraded.fingerprint() == spec.fingerprint()
    assert Upgraded.model_validate(json.loads(spec.to_env_json()) | {"someLaterSetting": 0.5}).fingerprint() != (
        spec.fingerprint()
    )


def test_make_check_prints_every_error_and_exits_non_zero(tmp_path):
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text(yaml.safe_dump({"config": edited(**{"train.learningRate": 1, "runpod.dataCenter": "X"})}))
    good = subprocess.run(
        [sys.executable, "-m", "infra.check", "sdxl-4090", "sd15-3090"], cwd=ROOT, capture_output=True, text=True
    )
    assert good.returncode == 0, good.stderr
    assert "ok   Pulumi.sdxl-4090.yaml" in good.stdout
    failed = subprocess.run([sys.executable, "-m", "infra.check", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert failed.returncode == 1
    assert "lorastack:train.learningRate = 1" in failed.stderr and "lorastack:runpod.dataCenter = 'X'" in failed.stderr
    missing = subprocess.run([sys.executable, "-m", "infra.check", "no-such-stack"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 1
    assert "no such stack file" in missing.stderr


def test_check_imports_no_deep_learning_stack():
    # `make check` and `pulumi preview` must stay light: the schema never pulls in torch or diffusers.
    code = "import sys, infra.check, infra.config; print(any(m in sys.modules for m in ('torch', 'diffusers')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_program_reads_config_as_the_pulumi_cli_hands_it_over():
    # The CLI passes scalars as bare text (`runpod`) and mappings as JSON: both must validate.
    import pulumi

    from infra.stack_files import load_from_pulumi

    as_cli = {key: value if isinstance(value, str) else json.dumps(value) for key, value in SDXL.items()}
    pulumi.runtime.set_all_config(as_cli)
    try:
        config = load_from_pulumi("sdxl-4090")
    finally:
        pulumi.runtime.set_all_config({})
    assert config.provider == "runpod" and config.train.family == "sdxl"


def test_replicate_deployment_instances_within_the_apis_bounds():
    # Replicate takes min_instances 0..5 and max_instances 0..20: more passes make check but fails pulumi up
    def deployment(**counts):
        replicate = {"owner": "me", "model": "lora", "hardware": "gpu-h100", "monthlyBudgetUsd": 100000,
                     "deployment": {"hardware": "gpu-t4", **counts}}
        try:
            parse_stack(edited(provider="replicate", runpod=None, replicate=replicate,
                               **{**AS_FLUX, "limits.maxCostUsd": 50}), SOURCE)
        except StackError as error:
            return error.problems
        return []

    assert any("replicate.deployment.maxInstances" in line for line in deployment(maxInstances=21))
    assert any("replicate.deployment.minInstances" in line for line in deployment(minInstances=6, maxInstances=20))
    assert deployment(minInstances=5, maxInstances=20) == []


def test_replicate_training_is_priced_at_the_trainers_hardware_not_the_models():
    from infra.replicate_backend.catalog import REPLICATE_HARDWARE_USD_PER_SECOND

    replicate = {"owner": "me", "model": "lora", "hardware": "gpu-t4", "trainingHardware": "gpu-h100"}
    flux = {**AS_FLUX, "limits.maxCostUsd": 50}
    config = parse_stack(edited(provider="replicate", runpod=None, replicate=replicate, **flux), SOURCE)
    estimate = config.cost_estimate()
    assert estimate.usd_per_hour == pytest.approx(REPLICATE_HARDWARE_USD_PER_SECOND["gpu-h100"] * 3600)
    cheaper = parse_stack(
        edited(provider="replicate", runpod=None, replicate=replicate | {"trainingHardware": "gpu-l40s"}, **flux),
        SOURCE,
    ).cost_estimate()
    assert cheaper.seconds_per_step > estimate.seconds_per_step  # an L40S is slower per step than an H100


def test_limits_below_the_runs_own_estimate_are_refused_naming_both_figures():
    with pytest.raises(StackError) as refused:
        parse_stack(edited(**{"limits.maxCostUsd": 0.01, "limits.maxHours": 0.1}), SOURCE)
    (line,) = refused.value.problems
    estimate = load_stack("sdxl-4090").cost_estimate()
    assert f"limits.maxCostUsd (0.01) is below this run's estimated cost (${estimate.usd:.2f})" in line
    assert f"limits.maxHours (0.1) is below this run's estimated time ({estimate.hours:.2f} h)" in line
    assert line.startswith(SOURCE)


@pytest.mark.parametrize("key, value", [
    ("train.triggerWord", "t" * 65),
    ("train.dataset.defaultCaption", "a caption " * 101),
    ("train.samplePrompts", ["a prompt " * 112]),
    ("train.dataset.source", "https://example.com/" + "d" * 2048 + ".zip"),
    ("train.baseModel", "owner/" + "m" * 251),
])
def test_free_text_longer_than_its_bound_is_refused(key, value):
    with pytest.raises(StackError) as refused:
        parse_stack(edited(**{key: value}), SOURCE)
    assert any(key.split(".")[-1] in line and "at most" in line for line in refused.value.problems), refused.value.problems


def test_a_spec_that_would_not_fit_the_pods_environment_is_refused_and_every_bounded_one_fits():
    from contract.spec import MAX_ENV_VALUE_BYTES, MAX_SPEC_ENV_BYTES

    # JSON writes each non-ASCII character as a 6-byte escape: 16 prompts at their length bound overflow
    prompts = ["\u00e9" * 1000] * 16
    with pytest.raises(StackError) as refused:
        parse_stack(edited(**{"train.samplePrompts": prompts, "train.sampleEvery": 100}), SOURCE)
    assert any(f"at most {MAX_SPEC_ENV_BYTES}" in line and "samplePrompts" in line for line in refused.value.problems)
    fits = parse_stack(edited(**{"train.samplePrompts": ["a" * 1000] * 16, "train.sampleEvery": 100}), SOURCE)
    assert len(fits.train.to_env_json()) <= MAX_SPEC_ENV_BYTES < MAX_ENV_VALUE_BYTES


def test_a_pod_environment_linux_cannot_start_a_process_with_is_refused_naming_the_variable():
    from infra.runpod_backend.component import MAX_POD_ENV_BYTES, startable_env

    ok = {"LORASTACK_SPEC": "x" * 1000, "HF_TOKEN": "hf_x"}
    assert startable_env(ok) == ok
    with pytest.raises(ValueError, match=r"HF_TOKEN would take 131083 bytes.*over 131072"):
        startable_env({**ok, "HF_TOKEN": "h" * (128 * 1024 + 1)})
    with pytest.raises(ValueError, match=f"at most {MAX_POD_ENV_BYTES}"):
        startable_env({f"V{index}": "v" * 100_000 for index in range(3)})
