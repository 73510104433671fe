"""Train on this machine (CPU or GPU), no pod: `make train-local DATA=folder FAMILY=sd15 MODEL=id-or-path`.

    python -m training.local --data DIR --family sd15 --model ID_OR_PATH [--steps N] [--out DIR]

The spec is built from the arguments and validated like a stack's. OUT is laid out like the pod's volume:
the run under OUT/runs/<run-id>/ (checkpoints, lora/, history.jsonl, samples/ and report.html: sample grids,
loss curve and the run's facts, opened from disk), and OUT/hf (downloaded base models), datasets/ and
cache/ re-used by later runs; an interrupted local run resumes when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from contract.families import FAMILY_NAMES
from contract.spec import SpecError, TrainSpec, parse_spec
from contract.workspace import RunPaths


def spec_from_args(args: argparse.Namespace) -> TrainSpec:
    raw = {
        "family": args.family,
        "baseModel": args.model,
        "dataset": {"source": str(args.data)},
        "steps": args.steps,
        "rank": args.rank,
        "learningRate": args.learning_rate,
        "seed": args.seed,
        "checkpointEvery": max(1, min(250, args.steps // 4)),
    }
    if args.resolution:
        raw["resolution"] = args.resolution  # else the schema's default: the base model's native size
    if args.trigger_word:
        raw["triggerWord"] = args.trigger_word
    if args.sample_prompt:
        raw["samplePrompts"] = args.sample_prompt
        raw["sampleEvery"] = args.sample_every or raw["checkpointEvery"]
    return parse_spec(raw, "command line", prefix="")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.local", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of images with .txt captions")
    parser.add_argument("--family", choices=FAMILY_NAMES, required=True)
    parser.add_argument("--model", required=True, help="Hugging Face model id or a local diffusers folder")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("outputs/local"))
    parser.add_argument("--resolution", type=int, help="default: the base model's native resolution")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--trigger-word")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--sample-prompt", action="append", help="a prompt to sample as training goes (repeatable); "
                        "the report shows a grid per sample step")  # fmt: skip
    parser.add_argument("--sample-every", type=int, help="steps between samples (default: at every checkpoint)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = spec_from_args(args)
    except SpecError as error:
        for line in error.problems:
            print(line, file=sys.stderr)
        return 2
    paths = RunPaths(args.out.resolve(), f"local-{spec.fingerprint()}")

    from contract import history
    from training.export import export_trained
    from training.loop import train
    from training.tracking import save_sample_images

    report_every = max(1, spec.steps // 50)

    def on_step(step: int, loss: float, lr: float) -> None:
        history.record_step(paths.run, step, loss, lr)
        if step % report_every == 0 or step == spec.steps:
            print(f"step {step}/{spec.steps}  loss {loss:.4f}  lr {lr:.2e}", flush=True)

    def on_samples(step: int, images: list, prompts: list[str]) -> None:
        save_sample_images(paths, step, images, prompts)

    started = time.monotonic()
    result = train(spec, paths, on_step=on_step, on_samples=on_samples)
    files = export_trained(result.state)
    for kind, path in files.items():
        print(f"{kind}: {path}")
    print(f"report: {write_report(spec, paths, result.state.accelerator.device, time.monotonic() - started)}")
    return 0


def write_report(spec: TrainSpec, paths: RunPaths, device, seconds: float) -> Path:
    """The run's report.html (grids, loss curve, facts) in its folder, as `make fetch` writes one for a pod."""
    import torch

    from contract.history import history_path, read_history
    from report import RunFacts, render_report

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    # This command's time is the run's unless it resumed an earlier one; then the trainer's time across them.
    resumed = bool(read_history(history_path(paths.run)).resumes)
    facts = RunFacts.from_spec(
        spec, stack="local", backend="local", gpu=gpu, run_id=paths.run_id, cost_usd=0.0,
        wall_seconds=None if resumed else seconds,
    )  # fmt: skip
    return render_report(paths.run, facts)


if __name__ == "__main__":
    raise SystemExit(main())
