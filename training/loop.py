"""The training step and loop: noise, the family's loss; optimiser, schedule, checkpoints, samples.

`train_step(state, micro_batches)` is THE optimisation step (the benchmark imports and times it);
`train(spec, paths, ...)` is the whole run: prepare data, load the model, cache features, resume from the
newest complete checkpoint, step until `spec.steps` or until asked to stop, checkpointing on the way.

Runs as one process, or as one process per GPU under `accelerate launch` (training/__main__.py does that):
accelerate wraps the denoiser for data parallelism, each process draws its own share of the batches, and
the main process alone writes shared files and reports.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from PIL import Image

from contract import history
from contract.spec import TrainSpec
from contract.workspace import RunPaths
from training import checkpoints
from training.data import BucketBatchSampler, prepare_dataset
from training.families import StepInputs
from training.latents import Batch, build_feature_cache, collate
from training.models import ComponentSource, load_models, mixed_precision_name, read_components, weight_dtype_for
from training.state import TrainState

StepCallback = Callable[[int, float, float], None]  # (step, loss, learning rate)
SamplesCallback = Callable[[int, list[Image.Image], list[str]], object]  # (step, images, prompts); the result is unused


@dataclass
class TrainResult:
    outcome: Literal["completed", "stopped"]
    step: int
    loss: float | None  # the last step's loss (None when no step ran in this process)
    state: TrainState


def make_accelerator(spec: TrainSpec) -> Accelerator:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return Accelerator(mixed_precision=mixed_precision_name(weight_dtype_for(spec, device)))


def build_state(
    spec: TrainSpec, paths: RunPaths, accelerator: Accelerator | None = None, source: ComponentSource = read_components
) -> TrainState:
    """Everything a run needs, at step 0: data prepared, model loaded with fresh LoRA, features cached."""
    accelerator = accelerator or make_accelerator(spec)
    set_seed(spec.seed)
    with accelerator.main_process_first():  # one process prepares, the others find it on the volume
        dataset = prepare_dataset(spec, paths)
    models = load_models(spec, accelerator.device, cache_dir=paths.hf_home / "hub", source=source)

    features = None
    if spec.cache_latents:
        with accelerator.main_process_first():
            features, _ = build_feature_cache(models, dataset, spec, paths)
        models.offload_encoders()

    trained = models.trained_modules()
    groups = [{"params": [p for p in models.denoiser.parameters() if p.requires_grad], "lr": spec.learning_rate}]
    if spec.train_text_encoder:
        encoder_params = [p for e in models.text_encoders.values() for p in e.parameters() if p.requires_grad]
        groups.append({"params": encoder_params, "lr": spec.text_encoder_learning_rate or spec.learning_rate})
    optimizer = torch.optim.AdamW(groups, fused=accelerator.device.type == "cuda")
    # Not passed to accelerate.prepare: a prepared scheduler steps once per process per step.
    lr_scheduler = get_scheduler(
        spec.lr_scheduler, optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=spec.steps
    )
    names = list(trained)
    prepared = accelerator.prepare(*trained.values(), optimizer)
    trained = dict(zip(names, prepared[:-1], strict=True))
    optimizer = prepared[-1]

    sampler = BucketBatchSampler(
        [sample.bucket for sample in dataset.samples], spec.batch_size, spec.dataset.repeats, spec.seed
    )
    return TrainState(
        spec=spec,
        paths=paths,
        models=models,
        dataset=dataset,
        features=features,
        sampler=sampler,
        accelerator=accelerator,
        trained=trained,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        noise_generator=torch.Generator().manual_seed(spec.seed + accelerator.process_index),
    )


def next_micro_batches(state: TrainState) -> list[Batch]:
    """This process's micro-batches for the next optimisation step (gradientAccumulation of them).

    Every process walks the same batch order and keeps every N-th batch: the processes see disjoint data
    and the sampler position is the same everywhere, so one saved position resumes them all.
    """
    processes, rank = state.accelerator.num_processes, state.accelerator.process_index
    batches = []
    for _ in range(state.spec.gradient_accumulation):
        drawn = [state.sampler.next_batch() for _ in range(processes)]
        batches.append(collate(state.dataset, drawn[rank], state.features))
    return batches


# ------------------------------------------------------------------------------------------------- loss


def _randn(state: TrainState, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=state.noise_generator, dtype=torch.float32).to(like)


def _inputs(
    state: TrainState, batch: Batch
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Latents, text conditioning and conditioning from the images for a batch: from the cache, or encoded now."""
    models, device = state.models, state.accelerator.device
    if batch.latents is not None:
        latents = batch.latents.to(device, dtype=models.weight_dtype)
        image = batch.image or {}
    elif batch.pixels is not None:
        latents = models.encode_images(batch.pixels, state.noise_generator).to(device)
        image = models.encode_image_conditioning(batch.pixels)
    else:
        raise ValueError(f"batch {batch.sample_ids}: neither cached latents nor pixels to encode")
    image = {name: value.to(device, dtype=models.weight_dtype) for name, value in image.items()}
    if batch.text is not None:
        text = {name: value.to(device, dtype=models.weight_dtype) for name, value in batch.text.items()}
    else:
        encoders = {name: state.trained.get(name, module) for name, module in models.text_encoders.items()}
        with torch.set_grad_enabled(models.train_text_encoder):
            text = models.encode_text(models.tokenize(batch.captions), encoders)
    return latents, text, image


def _noise(state: TrainState, latents: torch.Tensor) -> torch.Tensor:
    noise = _randn(state, tuple(latents.shape), latents)
    if state.spec.noise_offset:
        # A per-channel constant shift teaches the model to change overall brightness (Guttenberg, 2023).
        noise = noise + state.spec.noise_offset * _randn(state, (*latents.shape[:2], 1, 1), latents)
    return noise


def compute_loss(state: TrainState, batch: Batch) -> torch.Tensor:
    latents, text, image = _inputs(state, batch)
    noise = _noise(state, latents)
    inputs = StepInputs(latents, text, noise, batch.time_ids, state.noise_generator, image)
    return state.models.family.loss(state.models, state.denoiser, inputs, state.spec)


# ------------------------------------------------------------------------------------------------- step


def train_step(state: TrainState, micro_batches: list[Batch]) -> float:
    """One optimisation step: forward and backward over the micro-batches, clip, AdamW, schedule.

    Returns the mean loss of the micro-batches. Gradients are synchronised between processes only on the
    last micro-batch.
    """
    accelerator = state.accelerator
    total = 0.0
    for position, batch in enumerate(micro_batches):
        with contextlib.ExitStack() as deferred_sync:
            if position < len(micro_batches) - 1:
                for module in state.trained.values():
                    deferred_sync.enter_context(accelerator.no_sync(module))
            with accelerator.autocast():
                loss = compute_loss(state, batch)
            accelerator.backward(loss / len(micro_batches))
        total += loss.detach().item()
    accelerator.clip_grad_norm_(state.models.trainable_parameters(), state.spec.max_grad_norm)
    state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return total / len(micro_batches)


def generate_samples(state: TrainState) -> list[Image.Image]:
    """One image per sample prompt, each from a fixed seed: successive samples show what training changed.

    Uses its own generators, so taking samples does not change the training run's random stream.
    """
    spec, models = state.spec, state.models
    defaults = models.family.facts.sample
    models.load_encoders()
    pipeline = models.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    images = []
    with state.accelerator.autocast():
        for index, prompt in enumerate(spec.sample_prompts):
            generated = pipeline(
                prompt,
                num_inference_steps=defaults.steps,
                guidance_scale=defaults.guidance,
                height=spec.resolution,
                width=spec.resolution,
                generator=torch.Generator().manual_seed(spec.seed + index),
            )
            images.append(generated.images[0])
    models.release_sample_components()
    if spec.cache_latents:
        models.offload_encoders()
    return images


def _on_every_process(state: TrainState, flag: bool) -> bool:
    """True when the flag is set in any process: all processes must stop at the same step."""
    if state.accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=state.accelerator.device)
    return bool(state.accelerator.reduce(value, reduction="sum").item() > 0)


def train(
    spec: TrainSpec,
    paths: RunPaths,
    *,
    on_step: StepCallback | None = None,
    on_samples: SamplesCallback | None = None,
    stop: threading.Event | None = None,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Train until spec.steps, resuming from the newest complete checkpoint of this run.

    `stop`: when set (SIGTERM, time or money limit), the loop saves a checkpoint after the current step
    and returns with outcome "stopped". `on_step` and `on_samples` run in the main process only.
    """
    state = build_state(spec, paths, accelerator)
    resume_from = checkpoints.latest(paths)
    if resume_from is not None:
        checkpoints.load_checkpoint(state, resume_from)
    main = state.accelerator.is_main_process
    if main:  # where each trainer process of the run began: the loss curve marks the restarts
        history.record_start(paths.run, state.step, state.dataset.data_hash, len(state.dataset.samples))
    loss = None
    while state.step < spec.steps:
        loss = train_step(state, next_micro_batches(state))
        if main and on_step is not None:
            on_step(state.step, loss, float(state.lr_scheduler.get_last_lr()[0]))  # torch types a tensor lr too
        if state.step % spec.checkpoint_every == 0 or state.step == spec.steps:
            checkpoints.save_checkpoint(state)
        if spec.sample_every and state.step % spec.sample_every == 0 and main and on_samples is not None:
            on_samples(state.step, generate_samples(state), list(spec.sample_prompts))
        if _on_every_process(state, stop is not None and stop.is_set()) and state.step < spec.steps:
            checkpoints.save_checkpoint(state)
            return TrainResult("stopped", state.step, loss, state)
    return TrainResult("completed", state.step, loss, state)

