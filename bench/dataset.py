"""`python -m bench.dataset`: how fast the trainer prepares a dataset, and in how much memory, on this CPU.

Measures, through the trainer's own `training.data.prepare_dataset`:
- images per second per core: generated 1024-px JPEG photos-like sources (some landscape and portrait, one in
  four stored sideways with an EXIF orientation), decoded, rotated upright, bucketed, resized and written, in
  one thread; CPU seconds of the process (so other load on the machine does not count) and wall seconds;
- peak memory of preparing one image: a 10000x10 strip (JPEG and PNG) and a 1024-px JPEG, each in a fresh
  process (Pillow allocates outside Python's allocator, so tracemalloc cannot see it): how far the process's
  peak resident memory rises above its resident memory before the image (Linux: the peak is reset first);
- the second look: `prepare_dataset` once more on an unchanged, already prepared 1,000-image folder (it must
  decide "nothing changed" without reading the images again), and the first, cold content hash for scale.

Writes bench/results/dataset-cpu.json (the machine's facts, the figures, the targets judged) and the
dataset part of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, features

from contract.dataset import folder_content_hash
from contract.spec import TrainSpec
from contract.workspace import RunPaths
from training.data import prepare_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "dataset-cpu.json"
README = Path(__file__).resolve().parent / "README.md"
SECTION_START = "<!-- dataset:start (python -m bench.dataset writes this part) -->"
SECTION_END = "<!-- dataset:end -->"
TARGET_IMAGES_PER_CORE_SECOND = 50.0
TARGET_SECOND_LOOK_SECONDS = 2.0
SOURCE_SIZES = ((1024, 1024), (1024, 768), (768, 1024), (1024, 576))
_EXIF_ORIENTATION = 0x0112


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Smooth shapes plus fine grain: compresses like a photo (~200-300 KB as a 1024-px JPEG at quality 90)."""
    width, height = size
    coarse = Image.fromarray(rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def write_sources(folder: Path, count: int, seed: int = 0) -> None:
    """`count` 1024-px JPEGs with captions; every fourth is stored sideways with EXIF orientation 6."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = photo_like(rng, SOURCE_SIZES[index % len(SOURCE_SIZES)])
        exif = Image.Exif()
        if index % 4 == 3:
            image = image.transpose(Image.Transpose.ROTATE_90)  # stored sideways; orientation 6 turns it back
            exif[_EXIF_ORIENTATION] = 6
        image.save(folder / f"photo-{index:04d}.jpg", quality=90, exif=exif)
        (folder / f"photo-{index:04d}.txt").write_text(f"a generated photo number {index}")


def _spec(folder: Path, resolution: int) -> TrainSpec:
    return TrainSpec.model_validate(
        {"family": "sdxl", "baseModel": "unused", "dataset": {"source": str(folder)}, "resolution": resolution}
    )


def measure_prepare(folder: Path, resolution: int, workers: int, scratch: Path, repeats: int) -> dict:
    """Prepare the folder from nothing (no file hashes remembered, nothing prepared) `repeats` times; the
    fastest run counts (the others lost time to other work on the machine)."""
    runs = []
    for _ in range(repeats):
        paths = RunPaths(Path(tempfile.mkdtemp(dir=scratch, prefix="volume-")), "bench")
        cpu, wall = time.process_time(), time.perf_counter()
        dataset = prepare_dataset(_spec(folder, resolution), paths, workers=workers)
        runs.append((time.process_time() - cpu, time.perf_counter() - wall))
        assert not dataset.reused
    cpu, wall = min(run[0] for run in runs), min(run[1] for run in runs)
    images = len(dataset.samples)
    return {
        "resolution": resolution,
        "images": images,
        "workers": workers,
        "repeats": repeats,
        "cpu_seconds": round(cpu, 3),
        "wall_seconds": round(wall, 3),
        "images_per_core_second": round(images / cpu, 1),
        "images_per_second_wall": round(images / wall, 1),
    }


# A fresh interpreter: import the trainer, prepare a small warm-up image, reset the kernel's peak-RSS mark
# (Linux: "5" into /proc/self/clear_refs), prepare the measured image, read the new peak (VmHWM).
_MEMORY_PROBE = """
import json, re, sys, tempfile
from pathlib import Path
from PIL import Image
from training.data import aspect_buckets, prepare_image

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

buckets = aspect_buckets(int(sys.argv[2]))
warm = Path(tempfile.mkdtemp()) / "warm.jpg"
Image.new("RGB", (64, 64), "gray").save(warm)
prepare_image(warm, buckets, "warm-up")[0].save(warm.with_suffix(".bmp"))
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
fitted, bucket, original, crop = prepare_image(Path(sys.argv[1]), buckets, sys.argv[1])
fitted.save(warm.with_suffix(".bmp"))
print(json.dumps({"peak_growth_mib": round((status("VmHWM") - before) / 1024, 1), "bucket": list(bucket)}))
"""


def peak_memory(image: Path, resolution: int) -> dict:
    """Peak resident memory growth of preparing one image, measured in a fresh process."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(image), str(resolution)],
        capture_output=True, text=True, check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(scratch: Path, resolution: int) -> list[dict]:
    rng = np.random.default_rng(1)
    cases = []
    strip = photo_like(rng, (10000, 64)).resize((10000, 10))
    for name, size, fmt in (
        ("10000x10 JPEG", (10000, 10), "JPEG"), ("10000x10 PNG", (10000, 10), "PNG"), ("1024x1024 JPEG", (1024, 1024), "JPEG"),
    ):
        image = strip if size == (10000, 10) else photo_like(rng, size)
        path = scratch / f"memory-{name.replace(' ', '-')}.{fmt.lower()}"
        image.save(path, fmt)
        cases.append({"source": name, "resolution": resolution, **peak_memory(path, resolution)})
    return cases


def measure_second_look(scratch: Path, sources: Path, count: int, resolution: int) -> dict:
    """A `count`-image folder (the generated sources' bytes, each made distinct) prepared once, then looked at again."""
    folder = scratch / "second-look"
    folder.mkdir()
    originals = sorted(sources.glob("*.jpg"))
    for index in range(count):
        # bytes after a JPEG's end-of-image marker are ignored by decoders: distinct files, same pictures
        data = originals[index % len(originals)].read_bytes() + index.to_bytes(4, "big")
        (folder / f"image-{index:04d}.jpg").write_bytes(data)
        (folder / f"image-{index:04d}.txt").write_text(f"caption {index}")
    cold = time.perf_counter()
    folder_content_hash(folder, cache_dir=scratch / "cold-hashes")
    cold = time.perf_counter() - cold
    # file hashes are remembered only for files older than a couple of seconds (a racing writer's guard)
    time.sleep(2.5)
    spec, paths = _spec(folder, resolution), RunPaths(scratch / "second-look-volume", "bench")
    prepare_dataset(spec, paths)
    again = time.perf_counter()
    dataset = prepare_dataset(spec, paths)
    again = time.perf_counter() - again
    assert dataset.reused
    return {"images": count, "first_content_hash_seconds": round(cold, 3), "second_look_seconds": round(again, 3)}


def machine() -> dict:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or platform.machine(),
    ) if Path("/proc/cpuinfo").exists() else platform.processor() or platform.machine()
    return {
        "cpu": model,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "pillow": Image.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "numpy": np.__version__,
        "torch": torch.__version__,  # its uint8 bicubic resize does the resizing
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def judge(document: dict) -> list[dict]:
    checks = [
        {
            "target": f">= {TARGET_IMAGES_PER_CORE_SECOND:.0f} images/s per core, "
                      f"1024-px JPEG sources at resolution {row['resolution']}",
            "value": row["images_per_core_second"],
            "met": row["images_per_core_second"] >= TARGET_IMAGES_PER_CORE_SECOND,
        }
        for row in document["prepare"]
        if row["workers"] == 1
    ]
    strip = next(row for row in document["peak_memory"] if row["source"] == "10000x10 JPEG")
    square = next(row for row in document["peak_memory"] if row["source"] == "1024x1024 JPEG")
    checks.append({
        "target": "a 10000x10 image's peak memory bounded by the target resolution (no more than a 1024-px image's + 16 MiB)",
        "value": strip["peak_growth_mib"],
        "met": strip["peak_growth_mib"] <= square["peak_growth_mib"] + 16,
    })
    look = document["second_look"]
    checks.append({
        "target": f"second look at an unchanged {look['images']}-image folder under {TARGET_SECOND_LOOK_SECONDS:.0f} s",
        "value": look["second_look_seconds"],
        "met": look["second_look_seconds"] < TARGET_SECOND_LOOK_SECONDS,
    })
    return checks


def readme_section(document: dict) -> list[str]:
    facts = document["machine"]
    lines = [
        f"Measured {facts['date'][:10]} on {facts['cpu']} ({facts['cpus_usable']} CPUs usable, load average "
        f"{facts['load_average_at_start'][0]} at the start), Pillow {facts['pillow']}, libjpeg-turbo {facts['libjpeg_turbo']}.",
        "",
        "Fastest of the repeated preparations (other work on the machine only slows a run down):",
        "",
        "| resolution | images | threads | CPU s | wall s | images/s per core | images/s wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in document["prepare"]:
        lines.append(
            f"| {row['resolution']} | {row['images']} | {row['workers']} | {row['cpu_seconds']} | {row['wall_seconds']} "
            f"| {row['images_per_core_second']} | {row['images_per_second_wall']} |"
        )
    lines += ["", "| one source image | resolution | bucket | peak memory growth (MiB) |", "|---|---|---|---|"]
    for row in document["peak_memory"]:
        width, height = row["bucket"]
        lines.append(f"| {row['source']} | {row['resolution']} | {width}x{height} | {row['peak_growth_mib']} |")
    look = document["second_look"]
    lines += [
        "",
        f"Second look at an unchanged, prepared {look['images']}-image folder: {look['second_look_seconds']} s "
        f"(its first, cold content hash: {look['first_content_hash_seconds']} s).",
        "",
    ]
    lines += [f"- {'met' if check['met'] else 'NOT met'}: {check['target']}: {check['value']}" for check in document["checks"]]
    return lines


def write_readme(document: dict, readme: Path = README) -> None:
    text = readme.read_text()
    start, end = text.index(SECTION_START) + len(SECTION_START), text.index(SECTION_END)
    readme.write_text(text[:start] + "\n" + "\n".join(readme_section(document)) + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataset", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="generated sources timed per resolution")
    parser.add_argument("--repeats", type=int, default=3, help="preparations timed per setting; the fastest counts")
    parser.add_argument("--second-look-images", type=int, default=1000)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-readme", dest="readme", action="store_false", help="leave bench/README.md alone")
    args = parser.parse_args(argv)

    facts = machine()
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as name:
        scratch = Path(name)
        sources = scratch / "sources"
        write_sources(sources, args.images)
        measure_prepare(sources, 512, 1, scratch, repeats=1)  # warm-up: first calls load codecs and kernels
        prepare_rows = [measure_prepare(sources, resolution, 1, scratch, args.repeats) for resolution in (1024, 512)]
        threads = facts["cpus_usable"]
        if threads > 1:
            prepare_rows.append(measure_prepare(sources, 1024, min(threads, 8), scratch, args.repeats))
        document = {
            "machine": facts,
            "prepare": prepare_rows,
            "peak_memory": measure_memory(scratch, 1024),
            "second_look": measure_second_look(scratch, sources, args.second_look_images, 512),
        }
    document["checks"] = judge(document)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(document, indent=2) + "\n")
    if args.readme:
        write_readme(document)
    for line in readme_section(document):
        print(line)
    return 0 if all(check["met"] for check in document["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
