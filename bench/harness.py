"""Time the trainer's own optimisation step (training.loop.train_step) at each stack's settings.

A measurement builds the run state with the trainer's `build_state` (dataset preparation, feature cache,
`load_models` with LoRA, fused AdamW, accelerate), with random-weight models from bench.models in place of
a download, then times `train_step(state, next_micro_batches(state))`, the loop's own body, step by step.
Speed options the stack file does not hold (attention kernel, optimizer kernel, memory layout,
torch.compile) are applied to the built state before its first step.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from accelerate.state import AcceleratorState
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.flops import count_step_flops
from bench.models import Architecture, in_memory_source
from contract import memory
from contract.families import facts_for
from contract.spec import TrainSpec
from contract.workspace import RunPaths
from infra.stack_files import load_stack
from training.loop import build_state, next_micro_batches, train_step

STACKS = ("sdxl-4090", "sd15-3090", "flux-h100", "sd35-4090", "ldm256-local")
DATASET_IMAGES = 4
MAX_BATCH_SIZE = 64  # TrainSpec's own limit
NO_SDPA_KERNEL = ("No available kernel", "No viable backend for scaled_dot_product_attention")


@dataclass(frozen=True)
class Stack:
    name: str
    gpu: str  # the stack's GPU, as CUDA names it
    spec: TrainSpec  # as the stack file says, with gradientCheckpointing `auto` decided for the stack's GPU


def load_bench_stack(name: str) -> Stack:
    """The stack's training spec, with `auto` checkpointing decided as the trainer would on the stack's own GPU.

    Measured on a bigger GPU, the stack's settings are still those it runs with on its own card.
    """
    config = load_stack(name)
    named_memory = config.backend.gpu_memory(config)
    if named_memory is None:
        raise ValueError(f"stacks/Pulumi.{name}.yaml: the bench measures stacks that name their GPU (RunPod, local, "
                         "...), whose memory decides the checkpointing")
    spec, (gpu, _) = config.train, config.backend.performance_gpu(config)
    if spec.gradient_checkpointing == "auto":
        needed = memory.plan(spec, named_memory[1]).gradient_checkpointing
        spec = spec.model_copy(update={"gradient_checkpointing": "on" if needed else "off"})
    return Stack(name, gpu, spec)


@dataclass(frozen=True)
class Variant:
    """One setting of the speed options; `baseline` is the stack's own."""

    name: str
    description: str
    spec_overrides: dict[str, object] = field(default_factory=dict)
    attention: tuple[str, ...] | None = None  # SDPBackend names allowed; None: PyTorch picks
    fused_optimizer: bool = True  # the trainer's AdamW is fused on CUDA
    channels_last: bool = False
    compile: bool = False
    cuda_only: bool = False  # unavailable on CPU, or identical to the baseline there
    unet_only: bool = False


BASELINE = Variant("baseline", "the stack's settings: cached features, bf16, SDPA (PyTorch picks), fused AdamW, eager")
CHECKPOINTING = (
    Variant("checkpointing-off", "gradient checkpointing off", {"gradient_checkpointing": "off"}),
    Variant("checkpointing-on", "gradient checkpointing on", {"gradient_checkpointing": "on"}),
)
OPTIONS = (
    Variant("no-feature-cache", "VAE latents and text embeddings computed every step", {"cache_latents": False}),
    Variant("fp32", "fp32 weights, no autocast", {"precision": "fp32"}, cuda_only=True),
    Variant("sdpa-math", "attention as matmuls and softmax, no fused kernel", attention=("MATH",)),
    Variant("sdpa-flash", "SDPA restricted to FlashAttention-2", attention=("FLASH_ATTENTION",), cuda_only=True),
    Variant(
        "sdpa-efficient", "SDPA restricted to the memory-efficient kernel", attention=("EFFICIENT_ATTENTION",),
        cuda_only=True,
    ),
    Variant("sdpa-cudnn", "SDPA restricted to cuDNN attention", attention=("CUDNN_ATTENTION",), cuda_only=True),
    Variant("foreach-adamw", "AdamW without the fused kernel (foreach)", fused_optimizer=False, cuda_only=True),
    Variant("channels-last", "the UNet in channels-last memory layout", channels_last=True, unet_only=True),
    Variant("compile", "torch.compile of the denoiser", compile=True, cuda_only=True),
)
VARIANTS = {variant.name: variant for variant in (BASELINE, *CHECKPOINTING, *OPTIONS)}


def applies(variant: Variant, family: str, device: torch.device) -> bool:
    if variant.cuda_only and device.type != "cuda":
        return False
    return not (variant.unet_only and facts_for(family).denoiser != "unet")


@dataclass
class Setup:
    device: torch.device
    architectures: dict[str, Architecture]  # by family
    work: Path  # prepared datasets and feature caches
    images: Path  # the generated dataset
    steps: int
    warmup: int
    peak_tflops: float | None  # dense bf16 peak of the device, for MFU
    resolution: int | None = None  # None: each stack's own
    flops_cache: dict[str, int] = field(default_factory=dict)


def run_spec(setup: Setup, stack: Stack, variant: Variant, batch_size: int) -> TrainSpec:
    """The stack's spec, pointed at the benchmark's data and random model, with the variant's settings."""
    raw = stack.spec.model_dump()
    raw.update(
        base_model=f"lorastack-bench/{stack.spec.family}-{setup.architectures[stack.spec.family].size}",
        revision=None,
        # DATASET_IMAGES images repeated batch_size times: every batch is full
        dataset={"source": str(setup.images), "repeats": batch_size},
        aspect_buckets=False,  # every image at resolution x resolution, the size the stacks are quoted at
        resolution=setup.resolution or stack.spec.resolution,
        batch_size=batch_size,
        sample_prompts=[],
        sample_every=None,
        wandb_project=None,
        hf_repo=None,
    )
    raw.update(variant.spec_overrides)
    return TrainSpec.model_validate(raw)


def _step_flops(setup: Setup, spec: TrainSpec) -> int:
    """Model FLOPs of one optimisation step, counted once per distinct setting (meta device, seconds)."""
    # Checkpointing and precision change how a step computes, not what: they share a count.
    key = spec.model_copy(update={"gradient_checkpointing": "off", "precision": "bf16"}).to_env_json()
    if key not in setup.flops_cache:
        counted = count_step_flops(setup.architectures[spec.family], spec, spec.batch_size)
        setup.flops_cache[key] = counted.total * spec.gradient_accumulation
    return setup.flops_cache[key]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _attention(backends: tuple[str, ...] | None) -> contextlib.AbstractContextManager:
    if backends is None:
        return contextlib.nullcontext()
    return sdpa_kernel([getattr(SDPBackend, name) for name in backends])


def _apply(state, variant: Variant) -> None:
    """The options a stack file does not hold, applied before the first step."""
    if not variant.fused_optimizer:
        for group in state.optimizer.param_groups:
            group["fused"] = False  # read at every step; before the first one AdamW initialises for foreach
    if variant.channels_last:
        state.models.denoiser.to(memory_format=torch.channels_last)
    if variant.compile:
        state.denoiser.compile()


def _gib(count: int) -> float:
    return round(count / 2**30, 3)


def _timed(setup: Setup, variant: Variant, spec: TrainSpec, steps: int, warmup: int) -> dict:
    device = setup.device
    paths = RunPaths(setup.work, "bench")
    # accelerate fixes mixed precision once per process; each measurement starts from a fresh state
    AcceleratorState._reset_state()
    state = build_state(spec, paths, source=in_memory_source(setup.architectures[spec.family], device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _apply(state, variant)
    with _attention(variant.attention):
        for _ in range(warmup):
            train_step(state, next_micro_batches(state))
        _synchronize(device)
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            train_step(state, next_micro_batches(state))
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
    row = {
        "gradient_checkpointing": state.models.gradient_checkpointing,
        "weight_dtype": str(state.models.weight_dtype).removeprefix("torch."),
        "step_seconds": [round(value, 5) for value in seconds],
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = _gib(torch.cuda.max_memory_allocated(device))
        row["peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved(device))
    return row


def _release(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # compiled graphs hold on to the module they were traced from
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    setup: Setup, stack: Stack, variant: Variant, batch_size: int, steps: int | None = None, warmup: int | None = None
) -> dict:
    """One row: median seconds per step after warm-up, images/s, peak memory, FLOPs and MFU (or out of memory)."""
    steps = setup.steps if steps is None else steps
    warmup = setup.warmup if warmup is None else warmup
    spec = run_spec(setup, stack, variant, batch_size)
    row: dict[str, object] = {
        "stack": stack.name,
        "family": spec.family,
        "variant": variant.name,
        "batch_size": batch_size,
        "gradient_accumulation": spec.gradient_accumulation,
        "resolution": spec.resolution,
        "rank": spec.rank,
        "steps": steps,
        "warmup": warmup,
    }
    if setup.device.type == "cuda":
        row["memory_before_gib"] = _gib(torch.cuda.memory_allocated(setup.device))  # a leak would show here
    try:
        row.update(_timed(setup, variant, spec, steps, warmup))
    except torch.OutOfMemoryError:
        row["status"] = "out of memory"
    except RuntimeError as error:
        # SDPA restricted to one kernel raises one of these (CUDA, CPU) when it cannot take the shapes or dtype
        if variant.attention is None or not any(text in str(error) for text in NO_SDPA_KERNEL):
            raise
        row["status"] = "no such attention kernel for these shapes"
    _release(setup.device)
    if "status" in row:
        return row
    seconds = statistics.median(cast("list[float]", row["step_seconds"]))  # set by _timed
    images = batch_size * spec.gradient_accumulation
    flops = _step_flops(setup, spec)
    row.update(
        status="ok",
        seconds_per_step=round(seconds, 5),
        images_per_second=round(images / seconds, 4),
        flops_per_step=flops,
        mfu=round(flops / seconds / (setup.peak_tflops * 1e12), 4) if setup.peak_tflops else None,
    )
    return row


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest n <= limit with fits(n), given that fitting is monotone (0 when nothing fits).

    Doubles from 1 until a size fails, then bisects between the last size that fit and the first that did not.
    """
    low, high = 0, limit + 1  # low fits (0 trivially), high does not (past the limit)
    probe = 1
    while probe < high and fits(probe):
        low, probe = probe, probe * 2
    high = min(high, probe)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def search_largest_batch(
    setup: Setup, stack: Stack, variant: Variant, limit: int, steps: int, warmup: int
) -> list[dict]:
    """Rows for every batch size tried on the way to the largest that fits; that one is marked."""
    tried: dict[int, dict] = {}

    def fits(batch_size: int) -> bool:
        tried[batch_size] = measure(setup, stack, variant, batch_size, steps, warmup)
        print(format_row(tried[batch_size]), flush=True)
        return tried[batch_size]["status"] == "ok"

    largest = largest_fitting(fits, limit)
    for batch_size, row in tried.items():
        row["largest_batch"] = batch_size == largest
    return [tried[size] for size in sorted(tried)]


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['stack']:<10} {row['variant']:<18} batch {row['batch_size']:>2}  {row['status']}"
    peak = f"{row['peak_memory_gib']:6.2f} GiB" if "peak_memory_gib" in row else ""
    mfu = f"MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
    return (
        f"{row['stack']:<10} {row['variant']:<18} batch {row['batch_size']:>2}  {row['seconds_per_step']:8.4f} s/step  "
        f"{row['images_per_second']:7.3f} img/s  {row['flops_per_step'] / 1e12:9.4g} TFLOP  {peak}  {mfu}"
    )


def run(
    setup: Setup, stacks: list[Stack], variants: list[Variant], search: bool, search_limit: int,
    search_steps: int, search_warmup: int, on_rows: Callable[[list[dict]], object] = lambda rows: None,
    on_stack_done: Callable[[str], object] = lambda stack: None,
) -> list[dict]:
    """Stack by stack: the stack's settings at batch 1 and at its own batch size; with `search`, the largest
    batch with gradient checkpointing off and on; every other option at the stack's batch size. `on_rows` gets
    each measurement as it is made (a run cut short by a time limit keeps what it measured), `on_stack_done` each
    stack whose every variant was measured."""
    rows = []
    for stack in stacks:
        for variant in variants:
            if not applies(variant, stack.spec.family, setup.device):
                continue
            if variant in CHECKPOINTING and search:  # prints each size as it is tried
                measured = search_largest_batch(setup, stack, variant, search_limit, search_steps, search_warmup)
            else:
                measured = []
                for batch_size in sorted({1, stack.spec.batch_size}) if variant is BASELINE else [stack.spec.batch_size]:
                    measured.append(measure(setup, stack, variant, batch_size))
                    print(format_row(measured[-1]), flush=True)
            rows += measured
            on_rows(measured)
        on_stack_done(stack.name)
    return rows
