"""`make check` as a user meets it: every problem of a stack in one pass, the nearest valid key for a typo, and one
clear error (never a traceback) for a malformed file, while the other stacks are still checked."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from infra.stack_files import StackError, load_stack_file, parse_stack
from tests.test_config import SOURCE, edited

ROOT = Path(__file__).resolve().parent.parent


def problems(config: dict) -> list[str]:
    with pytest.raises(StackError) as caught:
        parse_stack(config, SOURCE)
    return caught.value.problems


def has(lines: list[str], *fragments: str) -> bool:
    return any(all(fragment in line for fragment in fragments) for line in lines)


def test_six_mistakes_in_one_pass():
    config = edited(**{
        "train.learningRate": 1,  # a field error
        "train.rank": 0,  # another, same section
        "train.warmupSteps": 5000,  # a rule of the train section (warmupSteps < steps)
        "runpod.cloud": "COMMUNITY",  # a rule of the runpod section (a volume needs SECURE)
        "train.batchSize": 2, "train.gradientCheckpointing": "off",  # the memory fit: too big for 24 GB
        "limits.stalMinutes": 5,  # an unknown key
    })
    lines = problems(config)
    assert has(lines, "lorastack:train.learningRate = 1")
    assert has(lines, "lorastack:train.rank = 0")
    assert has(lines, "lorastack:train: ", "warmupSteps (5000) must be less than steps (1500)")
    assert has(lines, "lorastack:runpod: ", "cloud: SECURE")
    assert has(lines, "cannot fit runpod.gpuType 'NVIDIA GeForce RTX 4090'")
    assert has(lines, "lorastack:limits.stalMinutes", "did you mean `stallMinutes`?")
    assert len(lines) == 6, lines


def test_a_rule_is_not_judged_on_a_value_that_failed():
    # steps is invalid: "warmupSteps must be less than steps" would compare against a default, not the user's value
    lines = problems(edited(**{"train.steps": -5, "train.warmupSteps": 5000}))
    assert has(lines, "lorastack:train.steps = -5")
    assert not has(lines, "warmupSteps")


def test_the_memory_fit_runs_when_only_an_unrelated_key_failed():
    lines = problems(edited(**{"train.learningRate": 1, "train.batchSize": 2, "train.gradientCheckpointing": "off"}))
    assert has(lines, "learningRate") and has(lines, "cannot fit")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lorastack:trian", {"family": "sdxl"}, "lorastack:trian: unknown key; did you mean `lorastack:train`?"),
        ("lorastak:train", {"family": "sdxl"}, "unknown namespace 'lorastak'; did you mean `lorastack:train`?"),
        ("train", {"family": "sdxl"}, "train: write it as `lorastack:train`"),
        (7, "x", "config key 7: keys are `lorastack:<name>` text, not a number"),
    ],
)
def test_misspelt_and_malformed_top_level_keys(key, value, expected):
    config = edited()
    config[key] = value
    assert has(problems(config), expected)


def test_nested_typo_gets_the_nearest_key_of_its_level():
    config = edited()
    config["lorastack:runpod"]["volume"]["sizeGB"] = 50
    assert has(problems(config), "lorastack:runpod.volume.sizeGB", "did you mean `sizeGb`?")


def test_other_providers_config_is_not_judged():
    config = edited()
    config["aws:region"] = "eu-west-1"
    assert parse_stack(config, SOURCE).train.family == "sdxl"


@pytest.mark.parametrize("path", ["train.steps", "train.rank", "train.learningRate", "limits.maxHours",
                                  "runpod.gpuCount", "runpod.volume.sizeGb"])
def test_booleans_are_not_numbers(path):
    assert has(problems(edited(**{path: True})), f"lorastack:{path} = true", "must be a number, not true/false")


def test_the_unused_backend_section_is_refused():
    config = edited(replicate={"owner": "me", "model": "lora"})
    assert has(problems(config), "lorastack:replicate: this stack's provider is runpod", "ignored")


# --- malformed files: `python -m infra.check` over all of them at once ---------------------------------------------

SDXL_TEXT = (ROOT / "stacks" / "Pulumi.sdxl-4090.yaml").read_text()
BOMB = "\n".join(
    ["config:", '  a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    + [f"  a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
       for i in range(1, 10)]
) + "\n"
MALFORMED = {
    "list": ("- lorastack:provider: runpod\n", "must be a mapping with a `config:` key, not a list"),
    "config-list": ("config:\n  - lorastack:provider\n", "config: must be a mapping"),
    "latin1": ("config:\n  lorastack:train: {triggerWord: caf\xe9}\n".encode("latin-1"),
               "not UTF-8 text (byte 0xe9 on line 2)"),
    "deep": ("config:\n  x: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32 levels"),
    "bomb": (BOMB, "YAML aliases (*a0) are not allowed"),
    "duplicate": (SDXL_TEXT + "  lorastack:provider: replicate\n", "duplicate key 'lorastack:provider' (first at line"),
    "int-keys": ("config:\n  1: 2\n  lorastack:provider: runpod\n", "config key 1"),
    "yaml": ("config: {lorastack:provider: [runpod\n", "not valid YAML"),
}


def test_every_malformed_file_is_one_clear_error_and_the_others_are_still_checked(tmp_path):
    paths = []
    for name, (content, _) in MALFORMED.items():
        path = tmp_path / f"Pulumi.{name}.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        paths.append(str(path))
    good = tmp_path / "Pulumi.good.yaml"
    good.write_text(SDXL_TEXT)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "infra.check", *paths, str(good)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert "ok   Pulumi.good.yaml" in done.stdout
    for name, (_, expected) in MALFORMED.items():
        block = done.stderr.split(f"FAIL Pulumi.{name}.yaml\n", 1)[1].split("FAIL ", 1)[0]
        assert expected in block, (name, block)
    assert time.monotonic() - started < 30  # interpreter start and imports; the bomb itself is below


def test_an_alias_bomb_is_refused_at_once_in_bounded_memory(tmp_path):
    path = tmp_path / "Pulumi.bomb.yaml"
    path.write_text(BOMB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(StackError) as caught:
        load_stack_file(path)
    assert time.monotonic() - started < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB: nothing was expanded
    assert "aliases" in caught.value.problems[0]


def test_a_valid_stack_round_trips_through_the_loader(tmp_path):
    path = tmp_path / "Pulumi.mine.yaml"
    path.write_text(yaml.safe_dump({"config": edited()}))
    assert load_stack_file(path).runpod.gpu_type == "NVIDIA GeForce RTX 4090"
