"""A real (tiny) training run, exported: every file, loaded into the pipeline with diffusers' plain
`load_lora_weights`, renders the images the trained adapter renders (alpha 8, rank 4: a lost alpha shows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from contract.workspace import RunPaths
from training.export import export_trained
from training.loop import train

from .helpers import make_spec

PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "flux": FluxPipeline}


def render(pipeline, family: str) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    extra = {"max_sequence_length": 32} if family == "flux" else {}
    image = pipeline(
        "a red circle", num_inference_steps=3, height=256, width=256, generator=torch.Generator().manual_seed(0),
        output_type="np", **extra,
    ).images[0]  # fmt: skip
    return image


@pytest.mark.parametrize("family", sorted(PIPELINES))
def test_every_exported_file_renders_what_the_trained_adapter_renders(tiny_model, toy_images, workspace, family):
    spec = make_spec(family, tiny_model(family), toy_images, steps=3, learningRate=5e-3, alpha=8)
    paths = RunPaths(workspace, "run")
    result = train(spec, paths)
    files = export_trained(result.state, environ={})

    before = render(PIPELINES[family].from_pretrained(tiny_model(family)), family)
    denoiser = {"transformer" if family == "flux" else "unet": result.state.models.denoiser.eval()}
    expected = render(PIPELINES[family].from_pretrained(tiny_model(family), **denoiser), family)
    assert np.abs(expected - before).max() > 1e-3  # the trained LoRA changes the images

    lora_files = [files[kind] for kind in ("diffusers", "kohya") if kind in files]
    assert len(lora_files) == (1 if family == "flux" else 2)
    for path in lora_files:
        pipeline = PIPELINES[family].from_pretrained(tiny_model(family))
        pipeline.load_lora_weights(path.parent, weight_name=path.name)
        np.testing.assert_allclose(render(pipeline, family), expected, atol=1e-4, err_msg=path.name)
