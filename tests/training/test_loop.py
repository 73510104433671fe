"""Training end to end on tiny models: every family trains, checkpoints rotate, and a run killed after a
checkpoint, or asked to stop, resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from safetensors.torch import load_file

from contract.workspace import RunPaths
from training import checkpoints
from training.loop import train

from .helpers import make_spec


class Killed(Exception):
    """Stands in for a pod lost between two steps."""


def lora_state(result) -> dict[str, torch.Tensor]:
    return {
        f"{module_name}.{name}": p.detach().clone()
        for module_name, module in result.state.models.trained_modules().items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_each_family_trains_and_keeps_the_last_checkpoints(tiny_model, toy_images, workspace, family):
    spec = make_spec(family, tiny_model(family), toy_images, steps=4, checkpointEvery=1, keepCheckpoints=2)
    paths = RunPaths(workspace, f"run-{family}")
    steps = []
    result = train(spec, paths, on_step=lambda step, loss, lr: steps.append((step, loss, lr)))
    assert result.outcome == "completed" and result.step == 4
    assert [step for step, _, _ in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) and loss > 0 for _, loss, _ in steps)
    assert [step for step, _ in checkpoints.complete_checkpoints(paths)] == [3, 4]

    initial = load_file(checkpoints.directory_for(paths, 3) / "lora.safetensors")
    final = load_file(checkpoints.directory_for(paths, 4) / "lora.safetensors")
    assert initial.keys() == final.keys()
    assert any(not torch.equal(initial[k], final[k]) for k in final)  # the last step changed the adapter


RESUME_CASES = {
    # cached features, accumulation, Min-SNR, noise offset, warmup + cosine, mixed buckets in batches of 2
    "sd15-cached": ("sd15", {"gradientAccumulation": 2, "minSnrGamma": 5.0, "noiseOffset": 0.05,
                             "lrScheduler": "cosine", "warmupSteps": 2, "batchSize": 2}),
    # encoded on the fly (the VAE draw comes from the saved noise stream), text encoders trained too
    "sdxl-uncached-text-encoder": ("sdxl", {"cacheLatents": False, "trainTextEncoder": True,
                                            "textEncoderLearningRate": 5e-5}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tiny_model, toy_images, tmp_path, case):
    family, overrides = RESUME_CASES[case]
    spec = make_spec(family, tiny_model(family), toy_images, steps=5, checkpointEvery=2, learningRate=1e-3, **overrides)

    uninterrupted = train(spec, RunPaths(tmp_path / "a", "run"))

    paths = RunPaths(tmp_path / "b", "run")

    def kill_at_step_3(step, loss, lr):
        if step == 3:  # after step-2 was saved, before step-4
            raise Killed

    with pytest.raises(Killed):
        train(spec, paths, on_step=kill_at_step_3)
    assert checkpoints.latest_step(paths) == 2
    resumed_steps = []
    resumed = train(spec, paths, on_step=lambda step, loss, lr: resumed_steps.append(step))
    assert resumed_steps == [3, 4, 5]

    expected, actual = lora_state(uninterrupted), lora_state(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_stop_request_saves_a_checkpoint_and_the_next_run_finishes(tiny_model, toy_images, workspace):
    spec = make_spec("flux", tiny_model("flux"), toy_images, steps=4, checkpointEvery=4)  # none due at step 1
    paths = RunPaths(workspace, "run")
    stop = threading.Event()

    def stop_after_first(step, loss, lr):
        stop.set()  # as Lifecycle does on SIGTERM or at a limit

    stopped = train(spec, paths, on_step=stop_after_first, stop=stop)
    assert stopped.outcome == "stopped" and stopped.step == 1
    assert checkpoints.latest_step(paths) == 1

    finished = train(spec, paths)
    assert finished.outcome == "completed" and finished.step == 4
    assert checkpoints.latest_step(paths) == 4  # the final step is saved too: a rerun goes straight to export


def test_partial_checkpoint_directories_are_ignored(tiny_model, toy_images, workspace):
    spec = make_spec("flux", tiny_model("flux"), toy_images, steps=2, checkpointEvery=1)
    paths = RunPaths(workspace, "run")
    train(spec, paths)
    (paths.checkpoints / ".tmp-step-3").mkdir()  # a pod lost while writing
    (paths.checkpoints / "step-9").mkdir()  # no trainer.json: never completed
    assert checkpoints.latest(paths) == checkpoints.directory_for(paths, 2)


def test_resuming_with_a_different_spec_is_refused(tiny_model, toy_images, workspace):
    paths = RunPaths(workspace, "run")
    train(make_spec("flux", tiny_model("flux"), toy_images, steps=2), paths)
    with pytest.raises(checkpoints.CheckpointError, match="different training spec"):
        train(make_spec("flux", tiny_model("flux"), toy_images, steps=3), paths)


def test_samples_are_generated_every_sample_every_steps(tiny_model, toy_images, workspace):
    spec = make_spec(
        "flux", tiny_model("flux"), toy_images, steps=4, sampleEvery=2, samplePrompts=["a red circle", "a blue stripe"]
    )
    calls = []
    train(spec, RunPaths(workspace, "run"), on_samples=lambda *call: calls.append(call))
    assert [step for step, _, _ in calls] == [2, 4]
    for _, images, prompts in calls:
        assert prompts == ["a red circle", "a blue stripe"]
        assert [image.size for image in images] == [(256, 256), (256, 256)]
