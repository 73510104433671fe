"""Tiny random-weight models and toy datasets for the trainer's tests, built once per session on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training import tiny

torch.set_num_threads(2)  # the CI box and dev machines share two cores; more threads only contend


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family) -> folder of a tiny diffusers model of that family (built on first use)."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny.make_model(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def toy_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("toy-images")
    tiny.make_dataset(folder, 6)
    return folder


@pytest.fixture
def workspace(tmp_path) -> Path:
    return tmp_path / "workspace"

