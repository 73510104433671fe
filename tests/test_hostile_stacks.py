"""Hostile stack files (issue 14's list) through `make check` as a user runs it: each is refused naming the file, the
key and what is allowed, before anything is billed, and a secret in one is never printed back. And the family
defaults (issue 15): a stack that leaves `resolution` out trains at its base model's native size."""

from __future__ import annotations

import copy

import pytest
import yaml

from infra.check import main
from infra.stack_files import load_stack_file
from tests.test_config import SDXL, edited

HF_TOKEN = "hf_" + "Ab1" * 12
RUNPOD_KEY = "rpa_" + "X9" * 20
REPLICATE_TOKEN = "r8_" + "q7" * 19
OPENAI_KEY = "sk-" + "z4" * 24


def write(tmp_path, config: dict, name: str = "hostile"):
    path = tmp_path / f"Pulumi.{name}.yaml"
    path.write_text(yaml.safe_dump({"config": config}, sort_keys=False))
    return path


def refused(tmp_path, capsys, config: dict) -> list[str]:
    """`make check` on the stack: it fails, and every problem line names the file first."""
    path = write(tmp_path, config)
    assert main([str(path)]) == 1
    output = capsys.readouterr()
    header, *lines = output.err.splitlines()
    assert header == f"FAIL {path.name}"
    lines = [line.strip() for line in lines]
    assert lines and all(line.startswith(f"{path}: ") for line in lines), lines
    return [line.removeprefix(f"{path}: ") for line in lines]


def accepted(tmp_path, capsys, config: dict) -> str:
    path = write(tmp_path, config)
    code = main([str(path)])
    output = capsys.readouterr()
    assert code == 0, output.err
    return output.out


def has(lines: list[str], *fragments: str) -> bool:
    return any(all(fragment in line for fragment in fragments) for line in lines)


# --- dataset sources ---------------------------------------------------------------------------------------------

SOURCE_KEY = "lorastack:train.dataset.source"
ARCHIVES = ".zip, .tar, .tar.gz, .tgz"


@pytest.mark.parametrize(("source", "key", "allowed"), [
    ("file:///data/set", SOURCE_KEY, "give the folder as a plain path"),
    ("ftp://example.com/d.zip", SOURCE_KEY, "ftp:// is not supported; use an http(s) URL of a .zip"),
    ("s3://bucket/d.zip", SOURCE_KEY, "s3:// is not supported; use an http(s) URL of a .zip"),
    ("gs://bucket/d.zip", SOURCE_KEY, "gs:// is not supported"),
    ("https:///d.zip", SOURCE_KEY, "a URL needs a host"),
    ("https://example.com", SOURCE_KEY, f"its path ending in {ARCHIVES}"),
    ("https://example.com/", SOURCE_KEY, f"its path ending in {ARCHIVES}"),
    ("https://example.com/gallery.html", SOURCE_KEY, f"its path ending in {ARCHIVES}"),
    ("https://drive.example.com/file/d/1234/view", SOURCE_KEY, "a web page or a bare host is not a dataset"),
    ("hf://just-a-name", SOURCE_KEY, "a Hugging Face dataset is hf://owner/name"),
    # a relative path is a folder on this machine, relative to the project root (uploaded by `pulumi up`)
    ("../../no-such-place", "lorastack: train.dataset.source '../../no-such-place'", "does not exist on this machine"),
    ("datasets/../../root", "lorastack: train.dataset.source", "does not exist on this machine"),
    ("/workspace/../etc", "lorastack: train.dataset.source", "'..' leads off the volume"),
    ("/home/nobody/no-such-dataset", "lorastack: train.dataset.source '/home/nobody/no-such-dataset'",
     "does not exist on this machine"),
    ("./no-such-dataset", "lorastack: train.dataset.source", "does not exist on this machine"),
])
def test_dataset_sources_the_trainer_cannot_reach_are_refused(tmp_path, capsys, source, key, allowed):
    lines = refused(tmp_path, capsys, edited(**{"train.dataset.source": source}))
    assert has(lines, key, allowed), lines


def test_a_refused_url_never_shows_its_credentials(tmp_path, capsys):
    source = "https://alice:hunter2hunter2@example.com/gallery.html?X-Amz-Signature=deadbeefcafe#frag"
    lines = refused(tmp_path, capsys, edited(**{"train.dataset.source": source}))
    assert has(lines, f"{SOURCE_KEY} = 'https://example.com/gallery.html'", ARCHIVES), lines
    text = "\n".join(lines)
    assert "hunter2" not in text and "deadbeef" not in text and "alice" not in text


def test_every_source_kind_the_trainer_reads_is_accepted(tmp_path, capsys):
    laptop_folder = tmp_path / "my-images"
    laptop_folder.mkdir()
    for source in (
        "https://example.com/datasets/my-style.zip",
        "https://bucket.example.com/d.tar.gz?X-Amz-Signature=abc",  # a presigned URL: the path names the archive
        "http://example.com/d.TGZ",
        "hf://someone/some-dataset",
        "someone/some-dataset",
        "datasets/my-style",  # relative: on the volume
        "/workspace/datasets/my-style",
        str(laptop_folder),  # a folder on this machine, which `pulumi up` uploads (branch datain)
    ):
        assert "ok   Pulumi.hostile.yaml" in accepted(tmp_path, capsys, edited(**{"train.dataset.source": source}))


@pytest.mark.parametrize("extension", ["txt", ".t xt", "./../../etc/passwd", ".tar.gz", ".abcdefghijk", "."])
def test_caption_extensions_are_a_simple_dot_ext(tmp_path, capsys, extension):
    lines = refused(tmp_path, capsys, edited(**{"train.dataset.captionExtension": extension}))
    assert has(lines, "lorastack:train.dataset.captionExtension = ", "like '.txt' or '.caption'"), lines


# --- the image ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "key", "allowed"), [
    ({"repository": "ghcr.io/Lorastack/Trainer", "version": "0.1.0"}, "lorastack:image.repository", "lowercase"),
    ({"repository": "ghcr.io/lorastack/trainer ", "version": "0.1.0"}, "lorastack:image.repository", "no spaces"),
    ({"repository": "ghcr.io//trainer", "version": "0.1.0"}, "lorastack:image.repository", "[registry-host[:port]/]path"),
    ({"repository": "ghcr.io/lorastack/trainer:0.1.0", "version": "0.1.0"}, "lorastack:image.repository",
     "like ghcr.io/lorastack/trainer"),
    ({"repository": "https://ghcr.io/lorastack/trainer", "version": "0.1.0"}, "lorastack:image.repository",
     "Docker can pull"),
    ({"repository": "ghcr.io/lorastack/" + "t" * 260, "version": "0.1.0"}, "lorastack:image.repository",
     "at most 255 characters"),
    ({"version": "1.0.0+build.5"}, "lorastack:image.version = '1.0.0+build.5'", "no '+'"),
    ({"version": "0.1.0 "}, "lorastack:image.version", "not a Docker tag"),
    ({"version": "-0.1.0"}, "lorastack:image.version", "not a Docker tag"),
    ({"version": "latest"}, "lorastack:image.version = 'latest'", "pinned semver"),
    ("ghcr.io/Lorastack/trainer:0.1.0", "lorastack:image.repository = 'ghcr.io/Lorastack/trainer'", "lowercase"),
])
def test_image_references_that_cannot_be_pulled_are_refused(tmp_path, capsys, image, key, allowed):
    lines = refused(tmp_path, capsys, edited(image=image))
    assert has(lines, key, allowed), lines


def test_a_registry_with_a_port_and_a_digest_is_accepted(tmp_path, capsys):
    image = "registry.example.com:5000/team/lora-trainer:0.1.0@sha256:" + "a" * 64
    assert "ok" in accepted(tmp_path, capsys, edited(image=image))


# --- no volume -----------------------------------------------------------------------------------------------------


def without_volume(**runpod) -> dict:
    config = edited()
    config["lorastack:runpod"].update(volume=None, **runpod)  # `edited` would delete a key set to None
    return config


def test_no_volume_is_refused_unless_the_stack_states_the_checkpoints_are_lost(tmp_path, capsys):
    lines = refused(tmp_path, capsys, without_volume())
    assert lines == [
        "lorastack:runpod: volume is null: checkpoints, datasets and the model cache would live on the container "
        "disk and be lost whenever the pod stops or restarts; set volume: {sizeGb: ...}, or state the loss with "
        "checkpointsLostWithContainer: true"
    ]
    assert "ok" in accepted(tmp_path, capsys, without_volume(checkpointsLostWithContainer=True))
    lines = refused(tmp_path, capsys, edited(**{"runpod.checkpointsLostWithContainer": True}))
    assert has(lines, "lorastack:runpod: ", "checkpointsLostWithContainer is true but a volume is set"), lines


# --- secrets -------------------------------------------------------------------------------------------------------


def with_entries(**entries) -> dict:
    config = edited()
    config.update(entries)
    return config


@pytest.mark.parametrize(("config", "expected"), [
    (with_entries(**{"lorastack:RunPodAPIKey": RUNPOD_KEY}),
     "lorastack:RunPodAPIKey: holds a RunPod API key in plain text; lorastack reads it as the secret `runpodApiKey`: "
     "run `pulumi config set --secret runpodApiKey ...` (or export RUNPOD_API_KEY) and remove the plain value"),
    (with_entries(**{"lorastack:runpod_api_key": "not-shaped-like-a-key"}),
     "lorastack:runpod_api_key: a secret stored in plain text; lorastack reads it as the secret `runpodApiKey`"),
    (with_entries(**{"lorastack:REPLICATE_API_TOKEN": "abcdefgh"}),
     "lorastack:REPLICATE_API_TOKEN: a secret stored in plain text; lorastack reads it as the secret "
     "`replicateApiToken`: run `pulumi config set --secret replicateApiToken ...` (or export REPLICATE_API_TOKEN)"),
    (edited(**{"train.hfToken": HF_TOKEN}),
     "lorastack:train.hfToken: holds a Hugging Face token in plain text; lorastack reads it as the secret `hfToken`"),
    (with_entries(**{"aws:secretKey": "wJalrXUtnFEMIK7MDENG"}),
     "aws:secretKey: a secret stored in plain text; run `pulumi config set --secret aws:secretKey ...` and remove"),
    (with_entries(**{"myapp:database": {"host": "db.example.com", "Password": "correct horse"}}),
     "myapp:database.Password: a secret stored in plain text; run `pulumi config set --secret --path "
     "'myapp:database.Password' ...`"),
    (edited(**{"train.triggerWord": REPLICATE_TOKEN}),
     "lorastack:train.triggerWord: holds a Replicate API token in plain text"),
    (edited(**{"train.samplePrompts": ["a cat", f"a dog {OPENAI_KEY}"]}),
     "lorastack:train.samplePrompts[1]: holds a API secret key (sk-...) in plain text"),
    (with_entries(**{"lorastack:wandbApiKey": "0123456789abcdef"}),
     "lorastack:wandbApiKey: a secret stored in plain text; run `pulumi config set --secret wandbApiKey ...` "
     "(or export WANDB_API_KEY)"),
], ids=["RunPodAPIKey", "runpod_api_key", "REPLICATE_API_TOKEN", "nested-hfToken", "aws", "foreign-nested",
        "token-shaped-value", "token-in-a-list", "wandbApiKey"])
def test_secrets_in_plain_text_are_refused_under_any_name_and_never_printed(tmp_path, capsys, config, expected):
    path = write(tmp_path, config)
    assert main([str(path)]) == 1
    output = capsys.readouterr()
    lines = [line.strip().removeprefix(f"{path}: ") for line in output.err.splitlines()[1:]]
    assert has(lines, expected), lines
    for secret in (HF_TOKEN, RUNPOD_KEY, REPLICATE_TOKEN, OPENAI_KEY, "not-shaped-like-a-key", "abcdefgh",
                   "wJalrXUtnFEMIK7MDENG", "correct horse", "0123456789abcdef"):
        assert secret not in output.err and secret not in output.out


def test_a_secret_key_is_one_problem_not_also_an_unknown_key(tmp_path, capsys):
    lines = refused(tmp_path, capsys, edited(**{"train.hfToken": HF_TOKEN, "train.apiKey": "s3cr3t-value"}))
    assert len(lines) == 2 and all("plain text" in line for line in lines), lines


def test_no_other_problem_quotes_a_secret_even_in_part(tmp_path, capsys):
    # 17 prompts are one too many: that error quotes the list (cut at 80 characters), which holds a token
    prompts = ["a cat"] * 15 + [f"a dog {HF_TOKEN}", "a bird"]
    lines = refused(tmp_path, capsys, edited(**{"train.samplePrompts": prompts}))
    assert has(lines, "lorastack:train.samplePrompts[15]: holds a Hugging Face token"), lines
    assert has(lines, "lorastack:train.samplePrompts = ", "at most 16 items"), lines
    assert "hf_" not in "\n".join(lines)


def test_encrypted_secrets_and_innocent_names_are_accepted(tmp_path, capsys):
    config = with_entries(**{
        "aws:secretKey": {"secure": "v1:AAAABBBB"},
        "lorastack:runpodApiKey": {"secure": "v1:CCCCDDDD"},
        "myapp:database": {"password": {"secure": "v1:EEEE"}, "tokenizer": "clip", "maxTokens": 77},
    })
    assert "ok" in accepted(tmp_path, capsys, config)


# --- intervals and budgets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "expected"), [
    ({"train.checkpointEvery": 5000},
     "checkpointEvery (5000) is larger than steps (1500): it would never happen; set it to at most 1500"),
    ({"train.sampleEvery": 1501}, "sampleEvery (1501) is larger than steps (1500)"),
])
def test_intervals_longer_than_the_run_are_refused(tmp_path, capsys, changes, expected):
    lines = refused(tmp_path, capsys, edited(**changes))
    assert has(lines, "lorastack:train: ", expected), lines


def test_a_short_run_checkpoints_at_its_end_by_default(tmp_path):
    config = load_stack_file(write(tmp_path, edited(**{"train.steps": 100, "train.checkpointEvery": None,
                                                       "train.sampleEvery": None, "train.warmupSteps": 10})))
    assert config.train.checkpoint_every == 100


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("limits.maxCostUsd", float("inf"), "must be a finite number, at most $10,000"),
    ("limits.maxCostUsd", float("nan"), "must be a finite number, at most $10,000"),
    ("limits.maxHours", float("inf"), "must be a finite number, at most 168 hours"),
    ("limits.maxCostUsd", 1e9, "less than or equal to 10000"),
    ("limits.maxHours", 8760, "less than or equal to 168"),
    ("train.maxGradNorm", float("inf"), "finite number"),
    ("runpod.volume.sizeGb", float("inf"), ""),
])
def test_infinite_or_absurd_budgets_are_refused(tmp_path, capsys, key, value, allowed):
    lines = refused(tmp_path, capsys, edited(**{key: value}))
    assert has(lines, f"lorastack:{key} = ", allowed), lines


def test_an_absurd_replicate_budget_is_refused(tmp_path, capsys):
    replicate = {"owner": "me", "model": "lora", "monthlyBudgetUsd": float("inf")}
    config = edited(provider="replicate", runpod=None, replicate=replicate,
                    **{"train.family": "flux", "train.minSnrGamma": None, "train.noiseOffset": None})
    assert has(refused(tmp_path, capsys, config), "lorastack:replicate.monthlyBudgetUsd = ", "finite number")


# --- family defaults (issue 15) ------------------------------------------------------------------------------------


def sd15(**changes) -> dict:
    config = copy.deepcopy(SDXL)
    config["lorastack:runpod"]["gpuType"] = "NVIDIA GeForce RTX 3090"
    train = config["lorastack:train"]
    train.update(family="sd15", baseModel="stable-diffusion-v1-5/stable-diffusion-v1-5")
    for key, value in changes.items():
        if value is None:
            train.pop(key, None)
        else:
            train[key] = value
    return config


@pytest.mark.parametrize(("config", "resolution"), [
    (sd15(resolution=None), 512),
    (sd15(resolution=None, family="sd2", baseModel="stabilityai/stable-diffusion-2-1-base"), 512),
    (sd15(resolution=None, family="sd2", baseModel="stabilityai/stable-diffusion-2-1"), 768),  # a 768 v-prediction model
    (sd15(resolution=None, family="sd2", baseModel="stabilityai/stable-diffusion-2"), 768),
    (sd15(resolution=1024), 1024),  # said explicitly: kept
    (edited(**{"train.resolution": None}), 1024),  # SDXL
])
def test_resolution_defaults_to_the_base_models_native_size(tmp_path, config, resolution):
    loaded = load_stack_file(write(tmp_path, config))
    assert loaded.train.resolution == resolution
    assert f'"resolution":{resolution}' in loaded.train.to_env_json()  # the pod trains and samples at it too


def test_a_default_that_cannot_be_worked_out_adds_no_problem_of_its_own(tmp_path, capsys):
    lines = refused(tmp_path, capsys, sd15(family="sd3", resolution=None, checkpointEvery=None, steps="many"))
    assert has(lines, "lorastack:train.family = 'sd3'") and has(lines, "lorastack:train.steps = 'many'"), lines
    assert len(lines) == 2, lines  # nothing about resolution or checkpointEvery, which the user left out


def test_the_cost_estimate_follows_the_default_resolution(tmp_path):
    native = load_stack_file(write(tmp_path, sd15(resolution=None), "native")).cost_estimate()
    at_512 = load_stack_file(write(tmp_path, sd15(resolution=512), "at-512")).cost_estimate()
    at_1024 = load_stack_file(write(tmp_path, sd15(resolution=1024), "at-1024")).cost_estimate()
    assert native.seconds_per_step == at_512.seconds_per_step
    assert at_1024.seconds_per_step == pytest.approx(4 * native.seconds_per_step)  # four times the pixels


@pytest.mark.parametrize(("changes", "expected"), [
    ({"train.minSnrGamma": 5, "train.noiseOffset": None},
     "not supported for flux, a flow-matching model: minSnrGamma (min-SNR weighting needs a DDPM schedule's SNR); "
     "remove the key"),
    ({"train.minSnrGamma": None, "train.noiseOffset": 0.05},
     "noiseOffset (the flow-matching reference trainers add no offset noise)"),
    ({"train.minSnrGamma": 5, "train.noiseOffset": 0.05}, "minSnrGamma (min-SNR"),
    ({"train.minSnrGamma": 5, "train.noiseOffset": 0.05}, "; noiseOffset (the flow-matching"),
])
def test_ddpm_only_keys_are_refused_for_flux(tmp_path, capsys, changes, expected):
    config = edited(**{"train.family": "flux", "train.baseModel": "black-forest-labs/FLUX.1-dev",
                       "runpod.gpuType": "NVIDIA H100 80GB HBM3", "runpod.dataCenter": "US-KS-2",
                       "limits.maxCostUsd": 100, "limits.maxHours": 10, **changes})
    lines = refused(tmp_path, capsys, config)
    assert has(lines, "lorastack:train: ", expected), lines
    assert len(lines) == 1, lines


def test_the_shipped_stacks_pass_make_check(capsys):
    assert main([]) == 0
    assert "FAIL" not in capsys.readouterr().err
