"""`python -m bench.upload`: what sending a local dataset folder to a network volume costs (infra/runpod_backend/uploads.py).

Against a real S3 server on loopback (moto in server mode, as in the tests), standing in for RunPod's S3 API: a
folder of generated JPEGs (1,000 by default) is hashed and uploaded once; then the second `up` of the unchanged
folder is timed: hashing it again (contract.dataset's cache: `stat` calls, no file read) and finding its
manifest on the volume, i.e. deciding "nothing to upload" (target: under 2 s). Then one image is changed and the
new upload timed: one file sent, the others copied on the volume. Writes bench/results/upload-cpu.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from emulator.volume_buckets import EMULATOR_KEYS, S3Server, VolumeBuckets
from infra.runpod_backend import s3 as runpod_s3
from infra.runpod_backend import uploads

RESULTS = Path(__file__).parent / "results" / "upload-cpu.json"
TARGET_SECOND_UP_S = 2.0


def make_images(folder: Path, count: int, side: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for index in range(count):
        image = Image.effect_noise((side, side), 40 + index % 50).convert("RGB")
        image.save(folder / f"{index:05d}.jpg", quality=90)
        (folder / f"{index:05d}.txt").write_text(f"photo {index}, {rng.choice(['red', 'green', 'blue'])}")


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def run(images: int, side: int, workdir: Path) -> dict:
    os.environ["XDG_CACHE_HOME"] = str(workdir / "cache")  # a cold hash cache for the first look
    folder = workdir / "dataset"
    make_images(folder, images, side)
    with S3Server() as endpoint:
        VolumeBuckets(endpoint).create("benchvolume")
        s3 = runpod_s3.client("EU-RO-1", EMULATOR_KEYS, {runpod_s3.ENDPOINT_ENV: endpoint})
        first_scan, first_scan_s = timed(uploads.scan, folder)
        first, first_upload_s = timed(uploads.upload, first_scan, s3, "benchvolume", stream=io.StringIO())

        def second_up():
            return uploads.upload(uploads.scan(folder), s3, "benchvolume", stream=io.StringIO())

        second, second_up_s = timed(second_up)
        with (folder / "00000.jpg").open("ab") as handle:
            handle.write(b"\0")  # one changed image
        changed, changed_up_s = timed(lambda: uploads.upload(uploads.scan(folder), s3, "benchvolume",
                                                            stream=io.StringIO()))
    return {
        "dataset": {"images": images, "files": first_scan.file_count, "bytes": first_scan.total_bytes,
                    "image": f"{side}x{side} JPEG"},
        "first_up": {"hash_s": round(first_scan_s, 3), "upload_s": round(first_upload_s, 3),
                     "files_sent": first.files_sent, "bytes_sent": first.bytes_sent,
                     "mb_per_s": round(first.bytes_sent / 1e6 / first_upload_s, 1)},
        "second_up_unchanged": {"decide_s": round(second_up_s, 3), "files_sent": second.files_sent,
                                "bytes_sent": second.bytes_sent, "target_s": TARGET_SECOND_UP_S,
                                "met": second_up_s < TARGET_SECOND_UP_S and second.bytes_sent == 0},
        "one_image_changed": {"up_s": round(changed_up_s, 3), "files_sent": changed.files_sent,
                              "bytes_sent": changed.bytes_sent, "files_copied_on_volume": changed.files_copied},
    }


def machine() -> dict:
    import boto3
    import moto

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "boto3": boto3.__version__, "moto": moto.__version__,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "server": "moto server mode on 127.0.0.1 (in memory)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upload", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=256, help="image width and height in pixels")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lorastack-bench-upload-") as workdir:
        result = {"machine": machine(), **run(args.images, args.side, Path(workdir))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["second_up_unchanged"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
