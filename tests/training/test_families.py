"""One place per model family: the registry finds every family, each trains its tiny model through the
interface, and the pipeline-step modules never name a family or import a family's module."""

from __future__ import annotations

import ast
import json
import math
import typing
from pathlib import Path

import pytest
import torch

from contract.families import FAMILIES, FAMILY_NAMES
from contract.spec import Family
from contract.workspace import RunPaths
from training.families import ModelFamily, family_for
from training.loop import build_state, next_micro_batches, train_step

from .helpers import make_spec

ROOT = Path(__file__).resolve().parents[2]
# The trainer's steps: each works for any family by calling the family's interface.
PIPELINE_STEPS = [
    "training/data.py",
    "training/loop.py",
    "training/state.py",
    "training/checkpoints.py",
    "training/export.py",
    "training/tracking.py",
    "training/lifecycle.py",
    "training/latents.py",
    "training/models.py",
    "training/tiny.py",
    "training/local.py",
]


def family_references(source: str) -> list[str]:
    """Where a module's code names a family: a family name as a string, or an import of a family's module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in FAMILY_NAMES:
            found.append(f"line {node.lineno}: the literal {node.value!r}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in imported:
                if name.removeprefix("training.families.") in FAMILY_NAMES:
                    found.append(f"line {node.lineno}: imports {name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.removeprefix("training.families.") in FAMILY_NAMES:
                    found.append(f"line {node.lineno}: imports {alias.name}")
    return found


def test_the_check_finds_family_literals_and_family_module_imports():
    source = (
        "from training.families import sdxl\n"
        "import training.families.flux\n"
        "from training.families.sd15 import FAMILY\n"
        "if spec.family == 'sdxl':\n    pass\n"
    )
    assert [line.split(":")[0] for line in family_references(source)] == ["line 1", "line 2", "line 3", "line 4"]
    assert family_references("from training.families import family_for\nname = spec.family\n") == []


@pytest.mark.parametrize("module", PIPELINE_STEPS)
def test_pipeline_steps_never_name_a_family(module):
    assert family_references((ROOT / module).read_text()) == [], (
        f"{module} branches on a model family: move that code into training/families/<family>.py "
        "behind ModelFamily, or its facts into contract/families.py"
    )


def test_the_registry_has_a_module_for_every_family_the_schema_allows():
    assert typing.get_args(Family) == FAMILY_NAMES == tuple(FAMILIES)
    for name in FAMILY_NAMES:
        family = family_for(name)
        assert isinstance(family, ModelFamily) and family.name == name and family.facts is FAMILIES[name]
        assert family.denoiser_name in family.components and family.vae_name in family.components
        for names in (family.text_encoder_names, family.tokenizer_names):  # LDM's text encoder is `bert`
            assert set(names) <= set(family.components)
    known = r"\(known: sdxl, sd15, flux, sd2, sd35, kandinsky22, ldm256\)"
    with pytest.raises(ValueError, match=r"unknown model family 'sd3' " + known):
        family_for("sd3")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_builds_its_tiny_model_and_trains_a_step(tiny_model, toy_images, workspace, name):
    family = family_for(name)
    folder = tiny_model(name)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == family.pipeline_class.__name__
    # every component the family loads is in the folder; one of a pipeline folder inside it (Kandinsky's prior/)
    # is named <folder>_<component>, as diffusers' combined pipelines name them
    stored = set(index) | {
        f"{'_'.join(nested.parent.relative_to(folder).parts)}_{name}"
        for nested in folder.glob("*/**/model_index.json")
        for name in json.loads(nested.read_text())
    }
    assert set(family.components) <= stored

    spec = make_spec(name, folder, toy_images, steps=2, learningRate=1e-2)
    state = build_state(spec, RunPaths(workspace, f"one-step-{name}"))
    assert state.models.family is family
    before = {key: value.detach().clone() for key, value in state.denoiser.named_parameters() if value.requires_grad}
    loss = train_step(state, next_micro_batches(state))
    assert math.isfinite(loss) and loss > 0 and state.step == 1
    after = dict(state.denoiser.named_parameters())
    assert any(not torch.equal(before[key], after[key]) for key in before)  # the step moved the LoRA
