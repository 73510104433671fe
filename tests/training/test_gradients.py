"""Every trained parameter gets a gradient from the loss: DistributedDataParallel (one process per GPU, as
`accelerate launch` runs the trainer) fails on the second step when a parameter that requires grad never
receives one, and an adapter that no loss reaches is dead weight in the exported file."""

from __future__ import annotations

import pytest

from contract.workspace import RunPaths
from training.loop import build_state, compute_loss, next_micro_batches

from .helpers import make_spec


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_trained_text_encoder_and_unet_parameter_gets_a_gradient(tiny_model, toy_images, workspace, family):
    spec = make_spec(family, tiny_model(family), toy_images, trainTextEncoder=True, cacheLatents=False)
    state = build_state(spec, RunPaths(workspace, "r"))
    loss = compute_loss(state, next_micro_batches(state)[0])
    loss.backward()
    missing = [
        f"{module_name}.{name}"
        for module_name, module in state.models.trained_modules().items()
        for name, parameter in module.named_parameters()
        if parameter.requires_grad and parameter.grad is None
    ]
    assert not missing, f"{len(missing)} trained parameters receive no gradient, e.g. {missing[:4]}"
