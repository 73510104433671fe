"""`python -m bench` (`make bench`): time the trainer's real step at each stack's settings.

On a GPU: the SDXL, SD 1.5, FLUX.1-dev and SD 3.5 medium architectures at full size with random weights; results to
bench/results/<gpu>.json. On CPU: the same code on the tiny test models, in seconds (a smoke run; its
results file, *-tiny.json, is not committed). Both count FLOPs per image at full size on the meta device
(bench/results/flops.json) and rewrite the results part of bench/README.md.

    python -m bench --stacks sdxl-4090 --variants baseline,compile --no-search
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench import flops, harness, report
from bench.models import Size, architecture
from contract.families import FAMILY_NAMES
from training import tiny

TINY_RESOLUTION = 256  # TrainSpec's smallest: the smoke run's steps take milliseconds


def _names(value: str, allowed: list[str], what: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(allowed)})")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when there is one")
    parser.add_argument("--size", choices=["full", "tiny"], help="default: full on cuda, tiny on cpu")
    parser.add_argument(
        "--stacks", type=lambda v: _names(v, list(harness.STACKS), "stack"), default=list(harness.STACKS)
    )
    parser.add_argument(
        "--variants", type=lambda v: _names(v, list(harness.VARIANTS), "variant"), default=list(harness.VARIANTS),
        help="speed-option settings to measure (default: all that apply to the device)",
    )
    parser.add_argument("--no-search", dest="search", action="store_false", help="no largest-batch search")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default: 10 on cuda, 2 on cpu)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 3 on cuda, 1 on cpu)")
    parser.add_argument(
        "--search-limit", type=int, help=f"largest batch tried (default: {harness.MAX_BATCH_SIZE} on cuda, 2 on cpu)"
    )
    parser.add_argument(
        "--resolution", type=int, help=f"default: each stack's own at full size, {TINY_RESOLUTION} for tiny"
    )
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of a GPU the built-in table lacks")
    parser.add_argument(
        "--per-image-flops", action=argparse.BooleanOptionalAction, default=True,
        help="count FLOPs per image at full size on the meta device (default: on)",
    )
    parser.add_argument(
        "--skip-completed", action="store_true",
        help="leave out the stacks the results file already holds in full (a retry after a time limit)",
    )
    parser.add_argument("--results", type=Path, default=report.RESULTS_DIR)
    parser.add_argument("--readme", type=Path, default=report.README)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size: Size = args.size or ("full" if device.type == "cuda" else "tiny")
    if size == "full" and device.type != "cuda":
        print("full-size models are timed on a GPU only; on CPU use --size tiny", file=sys.stderr)
        return 2
    on_gpu = device.type == "cuda"
    environment = report.environment(device, size)
    path = args.results / report.results_name(environment)
    names = [name for name in args.stacks if not (args.skip_completed and name in report.completed_stacks(path))]
    if names != args.stacks:
        print(f"already measured in {path}: {', '.join(sorted(set(args.stacks) - set(names)))}", flush=True)
    stacks = [harness.load_bench_stack(name) for name in names]

    if args.per_image_flops and stacks:
        full = {family: architecture(family, "full") for family in FAMILY_NAMES}
        counts = flops.per_image_counts([(stack.name, stack.spec) for stack in stacks], full)
        flops_path = args.results / report.FLOPS_FILE
        flops_document = {
            "method": flops.METHOD, "versions": report.versions(), "counts": report.merged_flops(flops_path, counts)
        }
        args.results.mkdir(parents=True, exist_ok=True)
        flops_path.write_text(json.dumps(flops_document, indent=2) + "\n")
        for line in report.flops_table(flops_document):
            print(line)

    peak = args.peak_tflops or (report.BF16_DENSE_TFLOPS.get(str(environment["gpu"])) if on_gpu else None)
    if on_gpu and peak is None:
        print(f"no bf16 peak known for {environment['gpu']}: MFU is left out (--peak-tflops sets it)", file=sys.stderr)
    environment["peak_bf16_tflops"] = peak
    with tempfile.TemporaryDirectory(prefix="lorastack-bench-") as work:
        images = Path(work) / "images"
        tiny.make_dataset(images, harness.DATASET_IMAGES)
        setup = harness.Setup(
            device=device,
            architectures={family: architecture(family, size) for family in FAMILY_NAMES},
            work=Path(work),
            images=images,
            steps=args.steps or (10 if on_gpu else 2),
            warmup=args.warmup if args.warmup is not None else (3 if on_gpu else 1),
            peak_tflops=peak,
            resolution=args.resolution or (None if size == "full" else TINY_RESOLUTION),
        )
        rows = harness.run(
            setup,
            stacks,
            [harness.VARIANTS[name] for name in args.variants],
            search=args.search,
            search_limit=args.search_limit or (harness.MAX_BATCH_SIZE if on_gpu else 2),
            search_steps=3 if on_gpu else 1,
            search_warmup=1,
            # written as measured: a run stopped by a time limit keeps its rows, and a retry skips finished stacks
            on_rows=lambda measured: report.write_results(path, environment, measured),
            on_stack_done=lambda name: report.write_results(path, environment, [], done=name),
        )
    document = report.write_results(path, environment, rows)
    for check in document["checks"]:
        print(f"{'met' if check['met'] else 'NOT met'}: {check['target']}: {check['value']}")
    report.render_readme(args.results, args.readme)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
