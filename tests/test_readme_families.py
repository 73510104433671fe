"""The README's family table is what `make check` and `make cost` compute: a row per family, its native size, and
the memory and time estimates of its base models at batch 1 (checkpointing off / on), so a user comparing families
reads the figures the tools will apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract import memory
from contract.families import FAMILIES
from contract.spec import TrainSpec
from infra import pricing

README = Path(__file__).resolve().parent.parent / "README.md"
GPU = "NVIDIA GeForce RTX 4090"


def rows() -> dict[str, list[str]]:
    table = {}
    for line in README.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and cells[0].strip("`") in FAMILIES:
            table[cells[0].strip("`")] = cells
    return table


def base_models(name: str) -> list[str]:
    """The base models the row names: the family's own first one, then each variant's first."""
    facts = FAMILIES[name]
    return [*facts.base_models[:1], *(variant.base_models[0] for variant in facts.variants)]


def test_every_family_has_a_row():
    assert set(rows()) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_row_states_the_estimates_of_its_base_models(name):
    _, _, native, memory_cell, seconds_cell, *_ = rows()[name]
    assert str(FAMILIES[name].native_resolution) in native
    for base_model in base_models(name) or ["someone/fine-tune"]:
        spec = TrainSpec(family=name, base_model=base_model, dataset={"source": "/data"}, batch_size=1)
        off, on = memory.estimate(spec, False).total_gib, memory.estimate(spec, True).total_gib
        assert f"{off:.1f} / {on:.1f} GiB" in memory_cell, (base_model, off, on, memory_cell)
        if GPU in FAMILIES[name].for_base_model(base_model).seconds_per_step:
            seconds = pricing.seconds_per_step(name, GPU, spec.resolution, 1, base_model=base_model)
            assert f"{seconds:.2f}" in seconds_cell, (base_model, seconds, seconds_cell)
