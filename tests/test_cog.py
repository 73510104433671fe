"""The Cog layer (container/cog_train.py, container/cog_predict.py) with a tiny random-weight FLUX (and LDM 256,
whose pipeline has no LoRA loader) on CPU.

The dataset zip is made by the Replicate provider's own `dataset_zip`: what the provider uploads is what the
trainer unpacks.
"""

from __future__ import annotations

import importlib.util
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from infra.replicate_backend.training import dataset_zip
from training import tiny
from training.export import DIFFUSERS_WEIGHT_NAME

CONTAINER = Path(__file__).resolve().parent.parent / "container"
torch.set_num_threads(2)


def load(module: str):
    spec = importlib.util.spec_from_file_location(module, CONTAINER / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
    return loaded


cog_train, cog_predict = load("cog_train"), load("cog_predict")


def train_inputs(images: Path, base: Path, **overrides) -> dict:
    # called directly, not through Cog: every input is given (Input() defaults are field specs, not values)
    return {
        "input_images": images, "trigger_word": "TOK", "autocaption": False, "steps": 2, "lora_rank": 4,
        "learning_rate": 1e-2, "batch_size": 1, "resolution": "256", "family": "flux", "base_model": str(base),
        "seed": 7, "hf_repo_id": None, "hf_token": None, "wandb_project": None, "wandb_api_key": None, **overrides,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cog")
    base = tiny.make_model("flux", root / "base")
    tiny.make_dataset(root / "images", 3)
    images = root / "images.zip"
    images.write_bytes(dataset_zip(root / "images"))
    return base, images, cog_train.train(**train_inputs(images, base))


def test_train_returns_a_tar_with_the_lora_and_its_metadata(trained, tmp_path):
    base, _, output = trained
    assert output.weights.name == "trained_model.tar"
    with tarfile.open(output.weights) as archive:
        assert DIFFUSERS_WEIGHT_NAME in archive.getnames()
        archive.extractall(tmp_path, filter="data")
    with safe_open(tmp_path / DIFFUSERS_WEIGHT_NAME, framework="pt") as handle:
        metadata = handle.metadata()
        assert any("lora_B" in key for key in handle.keys())
    assert metadata["lorastack.family"] == "flux" and metadata["lorastack.base_model"] == str(base)
    assert metadata["lorastack.rank"] == "4" and metadata["lorastack.trigger_word"] == "TOK"


def test_the_predictor_loads_the_lora_into_the_base_and_it_changes_the_image(trained):
    _, _, output = trained
    predictor = cog_predict.Predictor()
    predictor.setup(weights=output.weights)
    assert "lorastack" in predictor.pipeline.get_list_adapters()["transformer"]

    def generate(scale: float) -> np.ndarray:
        path = predictor.run(prompt="a photo of TOK", lora_scale=scale, width=256, height=256,
                             num_inference_steps=2, guidance_scale=1.0, seed=0)
        return np.asarray(Image.open(path), dtype=np.int16)

    with_lora, without = generate(1.0), generate(0.0)
    assert with_lora.shape == (256, 256, 3)
    assert np.abs(with_lora - without).max() > 0  # the trained LoRA is applied


def test_the_predictor_loads_an_ldm256_lora_into_the_pipelines_unet(tmp_path):
    """LDMTextToImagePipeline has no load_lora_weights: the predictor loads the file into its UNet instead."""
    base = tiny.make_model("ldm256", tmp_path / "base")
    tiny.make_dataset(tmp_path / "images", 2)
    images = tmp_path / "images.zip"
    images.write_bytes(dataset_zip(tmp_path / "images"))
    output = cog_train.train(**train_inputs(images, base, family="ldm256", base_model=str(base), learning_rate=1e-2))
    predictor = cog_predict.Predictor()
    predictor.setup(weights=output.weights)
    assert predictor.pipeline.unet.peft_config.keys() == {"lorastack"}

    def generate(scale: float) -> np.ndarray:  # no size asked for: the model's native 256
        path = predictor.run(prompt="a photo of TOK", lora_scale=scale, width=None, height=None,
                             num_inference_steps=2, guidance_scale=6.0, seed=0)
        return np.asarray(Image.open(path), dtype=np.int16)

    with_lora = generate(1.0)
    assert with_lora.shape == (256, 256, 3)
    assert np.abs(with_lora - generate(0.0)).max() > 0  # the trained LoRA is applied, and its scale with it


def test_unsupported_or_unsafe_inputs_are_refused(trained, tmp_path):
    base, images, _ = trained
    with pytest.raises(ValueError, match="autocaption"):
        cog_train.train(**train_inputs(images, base, autocaption=True))
    escaping = tmp_path / "escaping.zip"
    with zipfile.ZipFile(escaping, "w") as archive:
        archive.writestr("../outside.png", b"not an image")
    with pytest.raises(ValueError, match="outside the dataset folder"):
        cog_train.unpack_images(escaping, tmp_path / "unpacked")
    with pytest.raises(Exception, match="learningRate"):
        cog_train.train(**train_inputs(images, base, learning_rate=0.5))
