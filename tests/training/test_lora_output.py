"""The trained LoRA, exported and loaded back with diffusers' `load_lora_weights`, changes the images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from training.export import export_trained
from training.loop import train
from contract.workspace import RunPaths

from .helpers import make_spec

PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "flux": FluxPipeline}


def render(pipeline, family: str) -> np.ndarray:
    extra = {"max_sequence_length": 32} if family == "flux" else {}
    image = pipeline(
        "a red circle", num_inference_steps=3, height=256, width=256, generator=torch.Generator().manual_seed(0),
        output_type="np", **extra,
    ).images[0]  # fmt: skip
    return image


@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_exported_lora_loads_into_the_pipeline_and_changes_its_output(tiny_model, toy_images, workspace, family):
    spec = make_spec(family, tiny_model(family), toy_images, steps=3, learningRate=5e-3)
    paths = RunPaths(workspace, "run")
    result = train(spec, paths)
    files = export_trained(result.state, environ={})

    pipeline = PIPELINES[family].from_pretrained(tiny_model(family))
    pipeline.set_progress_bar_config(disable=True)
    before = render(pipeline, family)
    pipeline.load_lora_weights(files["diffusers"].parent, weight_name=files["diffusers"].name)
    after = render(pipeline, family)
    assert np.abs(after - before).max() > 1e-3
