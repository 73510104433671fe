"""A run's live state: what the loop steps and a checkpoint saves and restores.

Its own module so that training/loop.py (which builds and steps it) and training/checkpoints.py (which
saves and restores it) both import it, and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from contract.spec import TrainSpec
from contract.workspace import RunPaths
from training.data import BucketBatchSampler, PreparedDataset
from training.latents import FeatureCache
from training.models import ModelBundle


@dataclass
class TrainState:
    spec: TrainSpec
    paths: RunPaths
    models: ModelBundle
    dataset: PreparedDataset
    features: FeatureCache | None  # None when latents are encoded on the fly (cacheLatents: false)
    sampler: BucketBatchSampler
    accelerator: Accelerator
    trained: dict[str, torch.nn.Module]  # the LoRA-carrying modules as accelerate prepared them (DDP-wrapped)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    noise_generator: torch.Generator  # CPU generator: noise, timesteps; saved in checkpoints for exact resume
    step: int = 0

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.trained[self.models.denoiser_name]
