"""Checkpoints: everything needed to continue a run exactly, written atomically, the last few kept.

runs/<id>/checkpoints/step-<n>/ holds the LoRA weights, the optimizer and lr-scheduler states, every
random state (python, numpy, torch, CUDA, the noise generator, one file per process) and the sampler's
position. It is written under a hidden temporary name on the same volume, fsynced, then renamed: a
directory named step-<n> is always complete, and a pod lost mid-write leaves only a temp dir to ignore.
Resuming restores it all, so a resumed run ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cloudapi.hosts import mirror_from_environment
from contract import history
from contract.workspace import RunPaths
from training.state import TrainState

_NAME = re.compile(r"^step-(\d+)$")
TRAINER_FILE = "trainer.json"  # written last: its presence is the sign of a complete checkpoint


class CheckpointError(RuntimeError):
    pass


def directory_for(paths: RunPaths, step: int) -> Path:
    return paths.checkpoints / f"step-{step}"


def complete_checkpoints(paths: RunPaths) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint, oldest first; temp and partial ones are ignored."""
    found = []
    if paths.checkpoints.is_dir():
        for entry in paths.checkpoints.iterdir():
            match = _NAME.match(entry.name)
            if match and (entry / TRAINER_FILE).is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def latest(paths: RunPaths) -> Path | None:
    """The newest complete checkpoint of the run, or None."""
    found = complete_checkpoints(paths)
    return found[-1][1] if found else None


def latest_step(paths: RunPaths) -> int:
    found = complete_checkpoints(paths)
    return found[-1][0] if found else 0


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _lora_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    return {
        f"{module_name}.{name}": parameter.detach().to("cpu").contiguous()
        for module_name, module in state.models.trained_modules().items()
        for name, parameter in module.named_parameters()
        if parameter.requires_grad
    }


def _random_states(state: TrainState) -> dict:
    version, mt_state, gauss = random.getstate()
    # the legacy tuple (the default; the dict form only with legacy=False)
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    kind, keys, position, has_gauss, cached_gaussian = legacy
    states = {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "noise": state.noise_generator.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_random_states(state: TrainState, states: dict) -> None:
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    state.noise_generator.set_state(states["noise"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(state: TrainState) -> Path:
    """Write step-<n> atomically (all processes call this; each writes its random states) and prune."""
    paths, accelerator = state.paths, state.accelerator
    final = directory_for(paths, state.step)
    if (final / TRAINER_FILE).is_file():  # this step is already saved (e.g. stopping right after a save)
        return final
    temp = paths.checkpoints / f".tmp-step-{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)  # a pod lost while writing this step before
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_random_states(state), temp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(_lora_tensors(state), temp / "lora.safetensors")
        torch.save(state.optimizer.state_dict(), temp / "optimizer.pt")
        torch.save(state.lr_scheduler.state_dict(), temp / "lr_scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), temp / "grad_scaler.pt")
        trainer = {
            "step": state.step,
            "sampler": state.sampler.state_dict(),
            "specFingerprint": state.spec.fingerprint(),
            "processes": accelerator.num_processes,
        }
        (temp / TRAINER_FILE).write_text(json.dumps(trainer, indent=2))
        for file in temp.iterdir():
            _fsync(file)
        _fsync(temp)
        shutil.rmtree(final, ignore_errors=True)  # an incomplete step-<n> (no trainer.json) is never kept
        os.rename(temp, final)
        _fsync(paths.checkpoints)
        history.record_checkpoint(paths.run, state.step)
        prune(paths, state.spec.keep_checkpoints)
        _mirror(paths, final)
    accelerator.wait_for_everyone()
    return final


def _mirror(paths: RunPaths, directory: Path) -> None:
    """Where the disk dies with its machine, the checkpoint goes to the mirror too (cloudapi.hosts.Mirror). A failed
    upload is logged, not fatal: training goes on, and the next checkpoint tries again (a lost host meanwhile
    resumes from the mirror's older one)."""
    try:
        mirror = mirror_from_environment(os.environ)
        if mirror is None:
            return
        mirror.push_checkpoint(paths, directory)
    except Exception as error:  # the client has retried already; say so and train on
        print(f"checkpoints: could not mirror {directory.name}: {error}", file=sys.stderr, flush=True)
        return
    print(f"checkpoints: {directory.name} copied to {mirror.where(paths)}", file=sys.stderr, flush=True)


def prune(paths: RunPaths, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and temp dirs of earlier steps."""
    found = complete_checkpoints(paths)
    for _, directory in found[:-keep]:
        shutil.rmtree(directory, ignore_errors=True)
    newest = found[-1][0] if found else 0
    for entry in paths.checkpoints.glob(".tmp-step-*"):
        step = entry.name.removeprefix(".tmp-step-")
        if step.isdigit() and int(step) <= newest:
            shutil.rmtree(entry, ignore_errors=True)


def load_checkpoint(state: TrainState, directory: Path) -> None:
    """Restore a checkpoint into a freshly built state (same spec), in place."""
    trainer = json.loads((directory / TRAINER_FILE).read_text())
    if trainer["specFingerprint"] != state.spec.fingerprint():
        raise CheckpointError(
            f"{directory} was written by a different training spec ({trainer['specFingerprint']}, this run is "
            f"{state.spec.fingerprint()}): a changed spec is a new run; use a new run id"
        )
    device = state.accelerator.device
    tensors = load_file(directory / "lora.safetensors")
    parameters = {
        f"{module_name}.{name}": parameter
        for module_name, module in state.models.trained_modules().items()
        for name, parameter in module.named_parameters()
        if parameter.requires_grad
    }
    if set(tensors) != set(parameters):
        raise CheckpointError(f"{directory}: its LoRA parameters do not match this model's adapters")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(tensors[name].to(device))
    state.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))
    state.lr_scheduler.load_state_dict(torch.load(directory / "lr_scheduler.pt", weights_only=True))
    if state.accelerator.scaler is not None and (directory / "grad_scaler.pt").is_file():
        state.accelerator.scaler.load_state_dict(torch.load(directory / "grad_scaler.pt", weights_only=True))
    state.sampler.load_state_dict(trainer["sampler"])
    state.step = trainer["step"]

    own = directory / f"rng-{state.accelerator.process_index}.pt"
    if own.is_file():
        _restore_random_states(state, torch.load(own, weights_only=True))
    else:
        # Resumed on more GPUs than it was saved with: this process has no saved stream; start a fresh,
        # still seeded one (the run continues correctly, only not bit-identical to an uninterrupted one).
        state.noise_generator.manual_seed(state.spec.seed + state.step * 1000 + state.accelerator.process_index)
