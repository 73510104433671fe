"""Small, fast specs for the tiny models (shared by the trainer's tests)."""

from __future__ import annotations

from pathlib import Path

from contract.spec import TrainSpec


def make_spec(family: str, model: Path, data: Path, **overrides) -> TrainSpec:
    """A small, fast spec for the tiny models (overrides by camelCase key)."""
    raw = {
        "family": family,
        "baseModel": str(model),
        "dataset": {"source": str(data)},
        "resolution": 256,
        "steps": 4,
        "rank": 4,
        "checkpointEvery": 2,
        "seed": 7,
    }
    raw.update(overrides)
    return TrainSpec.model_validate(raw)
