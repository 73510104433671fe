"""Datasets: from a folder, an archive URL or a Hugging Face dataset to bucketed, captioned, cached images.

A source is a folder of images with same-named caption files (kohya convention), an http(s) URL of a
.zip/.tar/.tar.gz of such a folder, or a Hugging Face dataset repository of image files (captions in
same-named files or in an imagefolder `metadata.jsonl`/`metadata.csv`). The prepared dataset (images
resized and cropped to their aspect bucket, final captions) lives on the volume under
`datasets/<content-hash>/`, so a second run with the same images, captions and settings prepares nothing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import re
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from contract.spec import DatasetSpec, TrainSpec
from contract.workspace import RunPaths, atomic_file, atomic_write_json, read_json

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
BUCKET_STEP = 64  # bucket sides are multiples of this (VAE 8x, FLUX packing 2x, UNet down-blocks)
MAX_ASPECT_RATIO = 2.0  # longest bucket side at most twice the shortest, as kohya's default
# Part of the content hash: changing how images are prepared must not re-use datasets prepared the old way.
PREPARE_VERSION = 1
_HF_ID = re.compile(r"^(hf://)?[\w.-]+/[\w.-]+$")


class DatasetError(ValueError):
    """A dataset that cannot be used, in words a user can act on."""


@dataclass(frozen=True)
class Sample:
    id: str  # stable within a prepared dataset: the cache key of its latents and text embeddings
    file: str  # prepared image, relative to the dataset root
    caption: str
    bucket: tuple[int, int]  # (width, height)
    original_size: tuple[int, int]  # (height, width) before resizing: SDXL's micro-conditioning
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image: SDXL's micro-conditioning


@dataclass(frozen=True)
class PreparedDataset:
    root: Path
    data_hash: str
    samples: tuple[Sample, ...]
    reused: bool  # True when an earlier run had prepared it

    def by_id(self) -> dict[str, Sample]:
        return {sample.id: sample for sample in self.samples}

    def pixels(self, sample: Sample) -> torch.Tensor:
        """The prepared image as a (3, height, width) float tensor in [-1, 1], the VAE's input range."""
        with Image.open(self.root / sample.file) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)


# ---------------------------------------------------------------------------------------------- buckets


def aspect_buckets(resolution: int) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution² pixels, sides multiples of 64, aspect ratio up to 2:1."""
    area = resolution * resolution
    buckets = set()
    for width in range(BUCKET_STEP, 2 * resolution + 1, BUCKET_STEP):
        height = (area // width) // BUCKET_STEP * BUCKET_STEP
        if height >= BUCKET_STEP and max(width, height) / min(width, height) <= MAX_ASPECT_RATIO:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space: 2:1 and 1:2 are equally far)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda bucket: (abs(math.log(bucket[0] / bucket[1]) - ratio), -bucket[0] * bucket[1]))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the image just covers the bucket, then centre-crop the excess; returns (image, (top, left))."""
    target_width, target_height = bucket
    scale = max(target_width / image.width, target_height / image.height)
    width = max(target_width, round(image.width * scale))
    height = max(target_height, round(image.height * scale))
    resized = image.resize((width, height), Image.Resampling.LANCZOS)
    left, top = (width - target_width) // 2, (height - target_height) // 2
    return resized.crop((left, top, left + target_width, top + target_height)), (top, left)


# ---------------------------------------------------------------------------------------------- sources


def _download(url: str, destination: Path) -> None:
    import requests

    with atomic_file(destination) as out, requests.get(url, stream=True, timeout=60) as response:
        if response.status_code != 200:
            raise DatasetError(f"dataset.source {url}: download failed with HTTP {response.status_code}")
        for chunk in response.iter_content(chunk_size=1 << 20):
            out.write(chunk)


def safe_extract(archive: Path, destination: Path) -> None:
    """Extract a zip or tar(.gz) into `destination`, refusing members that would land outside it."""
    root = destination.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.infolist():
                target = (root / member.filename).resolve()
                if not target.is_relative_to(root) or member.filename.startswith(("/", "\\")):
                    raise DatasetError(f"{archive.name}: member {member.filename!r} points outside the archive")
                is_symlink = (member.external_attr >> 16) & 0o170000 == 0o120000
                if is_symlink:
                    raise DatasetError(f"{archive.name}: member {member.filename!r} is a symbolic link")
            bundle.extractall(root)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            try:
                # The "data" filter refuses absolute paths, "..", links out of the tree and device files.
                bundle.extractall(root, filter="data")
            except tarfile.FilterError as error:
                raise DatasetError(f"{archive.name}: {error}") from None
    else:
        raise DatasetError(f"{archive.name}: not a .zip, .tar or .tar.gz archive")


def _fetch_archive(url: str, paths: RunPaths) -> Path:
    """Download and extract once; later runs find the extracted folder on the volume."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    extracted = paths.datasets / "sources" / key
    if extracted.is_dir():
        return extracted
    archive = paths.datasets / "downloads" / key
    if not archive.is_file():
        _download(url, archive)
    extracted.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=extracted.parent, prefix=f".{key}."))
    try:
        safe_extract(archive, temp)
        os.rename(temp, extracted)
    except OSError:
        if not extracted.is_dir():  # another process renamed its copy first: theirs is as good
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return extracted


def _fetch_hub_dataset(repo_id: str, dataset: DatasetSpec, paths: RunPaths) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [f"*{extension}" for extension in sorted(IMAGE_EXTENSIONS)]
    patterns += [f"*{extension.upper()}" for extension in sorted(IMAGE_EXTENSIONS)]
    patterns += [f"*{dataset.caption_extension}", "*metadata.jsonl", "*metadata.csv"]
    try:
        folder = snapshot_download(
            repo_id, repo_type="dataset", allow_patterns=patterns, cache_dir=paths.hf_home / "hub"
        )
    except Exception as error:  # noqa: BLE001 - hub errors are many types; the user needs one line
        raise DatasetError(
            f"dataset.source {dataset.source!r}: no such folder here, and the Hugging Face dataset "
            f"{repo_id!r} could not be downloaded ({type(error).__name__}: {error})"
        ) from error
    return Path(folder)


def resolve_source(dataset: DatasetSpec, paths: RunPaths) -> Path:
    """The local folder holding the dataset's images, downloading it first when it is remote."""
    source = dataset.source
    if source.startswith(("http://", "https://")):
        return _fetch_archive(source, paths)
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    if _HF_ID.match(source) and not local.exists():
        return _fetch_hub_dataset(source.removeprefix("hf://"), dataset, paths)
    raise DatasetError(
        f"dataset.source {source!r}: not a folder, not an http(s) archive URL, not a Hugging Face dataset id"
    )


# --------------------------------------------------------------------------------------------- captions


def _metadata_captions(folder: Path, caption_column: str) -> dict[Path, str]:
    """Captions from Hugging Face imagefolder metadata files (a `file_name` column relative to the file)."""
    captions: dict[Path, str] = {}
    for metadata in sorted(folder.rglob("metadata.jsonl")):
        for line in metadata.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if "file_name" in row and caption_column in row:
                    captions[(metadata.parent / row["file_name"]).resolve()] = str(row[caption_column])
    for metadata in sorted(folder.rglob("metadata.csv")):
        with metadata.open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                if "file_name" in row and caption_column in row:
                    captions[(metadata.parent / row["file_name"]).resolve()] = row[caption_column]
    return captions


def with_trigger(caption: str, trigger_word: str | None) -> str:
    if not trigger_word or caption == trigger_word or caption.startswith(f"{trigger_word},"):
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word


def collect(folder: Path, dataset: DatasetSpec, trigger_word: str | None) -> list[tuple[Path, str]]:
    """(image, final caption) pairs, sorted by path so the order (and the content hash) is stable."""
    metadata = _metadata_captions(folder, dataset.caption_column)
    pairs = []
    for image in sorted(folder.rglob("*")):
        relative = image.relative_to(folder)
        if image.suffix.lower() not in IMAGE_EXTENSIONS or not image.is_file():
            continue
        if any(part.startswith(".") or part == "__MACOSX" for part in relative.parts):
            continue
        caption_file = image.with_suffix(dataset.caption_extension)
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
        else:
            caption = metadata.get(image.resolve(), dataset.default_caption).strip()
        pairs.append((image, with_trigger(caption, trigger_word)))
    if not pairs:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DatasetError(f"dataset.source {dataset.source!r}: no images ({extensions}) found")
    return pairs


# -------------------------------------------------------------------------------------------- preparing


def content_hash(pairs: list[tuple[Path, str]], folder: Path, spec: TrainSpec) -> str:
    """Hash of every image's bytes and caption and of the settings that shape the prepared images."""
    digest = hashlib.sha256()
    settings = {"version": PREPARE_VERSION, "resolution": spec.resolution, "aspectBuckets": spec.aspect_buckets}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for image, caption in pairs:
        digest.update(image.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(image.read_bytes()).digest())
        digest.update(caption.encode() + b"\0")
    return digest.hexdigest()[:20]


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, image).convert("RGB")
        return image.convert("RGB")


def _load_manifest(root: Path, reused: bool) -> PreparedDataset:
    manifest = read_json(root / "manifest.json")
    if manifest is None:
        raise DatasetError(f"{root}: prepared dataset without a readable manifest.json")
    samples = tuple(
        Sample(
            id=item["id"],
            file=item["file"],
            caption=item["caption"],
            bucket=tuple(item["bucket"]),
            original_size=tuple(item["originalSize"]),
            crop_top_left=tuple(item["cropTopLeft"]),
        )
        for item in manifest["samples"]
    )
    return PreparedDataset(root, manifest["dataHash"], samples, reused)


def prepare_dataset(spec: TrainSpec, paths: RunPaths) -> PreparedDataset:
    """The prepared dataset for this spec: re-used from the volume when an earlier run made it."""
    folder = resolve_source(spec.dataset, paths)
    pairs = collect(folder, spec.dataset, spec.trigger_word)
    data_hash = content_hash(pairs, folder, spec)
    final = paths.datasets / data_hash
    if (final / "manifest.json").is_file():
        return _load_manifest(final, reused=True)

    buckets = aspect_buckets(spec.resolution) if spec.aspect_buckets else [(spec.resolution, spec.resolution)]
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{data_hash}."))
    try:
        (temp / "images").mkdir()
        samples = []
        for index, (source, caption) in enumerate(pairs):
            image = _load_rgb(source)
            bucket = nearest_bucket(image.width, image.height, buckets)
            fitted, crop = fit_to_bucket(image, bucket)
            sample_id = f"{index:06d}"
            fitted.save(temp / "images" / f"{sample_id}.png", compress_level=1)
            samples.append(
                {
                    "id": sample_id,
                    "file": f"images/{sample_id}.png",
                    "source": source.relative_to(folder).as_posix(),
                    "caption": caption,
                    "bucket": list(bucket),
                    "originalSize": [image.height, image.width],
                    "cropTopLeft": list(crop),
                }
            )
        atomic_write_json(temp / "manifest.json", {"dataHash": data_hash, "samples": samples})
        os.rename(temp, final)
    except OSError:
        if not (final / "manifest.json").is_file():  # a concurrent run finished first: use its copy
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return _load_manifest(final, reused=False)


# ---------------------------------------------------------------------------------------------- sampler


class BucketBatchSampler:
    """Endless batches of sample indices, each batch from one aspect bucket, reshuffled every epoch.

    The order is a pure function of (seed, epoch), so the position (epoch, index into that epoch's
    batches) is all a checkpoint needs to continue exactly where a run stopped.
    """

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, repeats: int, seed: int):
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.repeats = repeats
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._cached_epoch: int | None = None
        self._batches: list[list[int]] = []

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cached_epoch != epoch:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            by_bucket: dict[tuple[int, int], list[int]] = {}
            for index, bucket in enumerate(self.buckets):
                by_bucket.setdefault(bucket, []).extend([index] * self.repeats)
            batches = []
            for bucket in sorted(by_bucket):
                members = by_bucket[bucket]
                rng.shuffle(members)
                size = self.batch_size
                batches += [members[start : start + size] for start in range(0, len(members), size)]
            rng.shuffle(batches)
            self._cached_epoch, self._batches = epoch, batches
        return self._batches

    def next_batch(self) -> list[int]:
        batches = self.epoch_batches(self.epoch)
        if self.index >= len(batches):
            self.epoch, self.index = self.epoch + 1, 0
            batches = self.epoch_batches(self.epoch)
        batch = batches[self.index]
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler position was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.index = state["epoch"], state["index"]

