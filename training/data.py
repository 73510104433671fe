"""Datasets: from a folder, an archive URL or a Hugging Face dataset to bucketed, captioned, cached images.

A source is a folder of images with same-named caption files (kohya convention), an http(s) URL of a
.zip/.tar/.tar.gz of such a folder, or a Hugging Face dataset repository of image files (captions in
same-named files or in an imagefolder `metadata.jsonl`/`metadata.csv`).

Everything is keyed by content, never by where it came from (contract.dataset holds the one content hash):
- an archive URL is fetched with the validators of its last answer (If-None-Match / If-Modified-Since), hashed
  as it streams and extracted once per archive sha256 under `datasets/sources/<sha256>/`; new bytes behind the
  same URL are a new archive. A download that breaks off or an archive that does not extract leaves nothing
  to be reused. When the server cannot be reached, what the same URL served before is used (a resumed pod
  whose presigned URL expired still finds its data), with a warning.
- the prepared dataset (images cropped and resized to their aspect bucket, final captions) lives under
  `datasets/<data-hash>/`, the hash of the folder's content and of the preparation settings, so a second run
  with the same images, captions and settings prepares nothing. The folder's file hashes are remembered
  under `cache/file-hashes/`: an unchanged folder is recognised from `stat` calls alone.

Preparing one image needs memory bounded by its bucket, not by the source: a JPEG much larger than its
bucket is decoded at a reduced scale (`Image.draft`), the region with the bucket's aspect ratio is cut out
before resizing (a 10000x10 strip becomes a 20x10 region, not a 700000x704 intermediate), and Pillow's
decompression-bomb limit refuses images over `Image.MAX_IMAGE_PIXELS`. Every error names the file.

Credentials in a dataset URL (user:password@, signed query strings) never leave this module: messages and
records carry `contract.redaction.redacted_source(url)`.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import json
import lzma
import math
import os
import posixpath
import random
import shutil
import sys
import tarfile
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image, ImageOps

from contract.dataset import (
    IMAGE_EXTENSIONS,
    DatasetError,
    DatasetFiles,
    classify_source,
    content_hash,
    dataset_files,
)
from contract.redaction import redacted_source
from contract.spec import ENV_MANAGED, DatasetSpec, TrainSpec
from contract.workspace import RunPaths, atomic_write_json, read_json

BUCKET_STEP = 64  # bucket sides are multiples of this (VAE 8x, FLUX packing 2x, UNet down-blocks)
MAX_ASPECT_RATIO = 2.0  # longest bucket side at most twice the shortest, as kohya's default
# Part of the data hash: changing how images are prepared must not re-use datasets prepared the old way.
PREPARE_VERSION = 2
# Archive caps: an archive past either is refused before anything is written (a zip bomb fills no volume).
MAX_ARCHIVE_FILES = 200_000
MAX_ARCHIVE_BYTES = 50 * 2**30  # unpacked; the download itself is held to it too
MAX_WORKERS = 8  # at most this many threads prepare images, each holding one image in memory
REDUCING_GAP = 3.0  # shrinking more than 3x: box-reduce by an integer factor first, as Pillow's reducing_gap
_CHUNK = 1 << 20
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow opens 16-bit greyscale PNGs as these
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


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
    """The bucket whose aspect ratio is closest to the image's (in log space: 2:1 and 1:2 are equally far).
    Aspect ratios past 2:1 get the most extreme bucket; fit_to_bucket cuts the middle of the image to it."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda bucket: (abs(math.log(bucket[0] / bucket[1]) - ratio), -bucket[0] * bucket[1]))


def crop_box(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred (left, top, right, bottom) region of an image of `size` with the bucket's aspect ratio."""
    width, height = size
    target_width, target_height = bucket
    if width * target_height > height * target_width:  # wider than the bucket: trim the sides
        kept = height * target_width / target_height
        left = (width - kept) / 2
        return left, 0.0, left + kept, float(height)
    kept = width * target_height / target_width
    top = (height - kept) / 2
    return 0.0, top, float(width), top + kept


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit greyscale scaled to 8 bits (a plain convert clips it to near-white), transparency
    composited on white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        levels = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return Image.fromarray(((levels * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An RGB image resized to `size` (width, height): bicubic with antialiasing, as Pillow's bicubic, on
    torch's vectorised uint8 path (with the conversions, half the time of Pillow's). An image more than
    REDUCING_GAP times larger is first box-reduced by an integer factor (no visible difference, far less work)."""
    factor = int(min(image.width / size[0], image.height / size[1]) / REDUCING_GAP)
    if factor >= 2:
        image = image.reduce(factor)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # a writable copy, as torch needs
    resized = torch.nn.functional.interpolate(pixels, size=(size[1], size[0]), mode="bicubic", antialias=True)
    return Image.fromarray(resized[0].permute(1, 2, 0).contiguous().numpy())  # Pillow copies strided arrays slowly


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Cut the centred region with the bucket's aspect ratio, then resize it to the bucket, as 8-bit RGB.

    Cutting first keeps memory bounded by the region and the bucket whatever the source's shape (a 10000x10
    strip into a 2:1 bucket is a 20x10 region). Returns (image, (top, left)): where the region starts in the
    whole image resized to cover the bucket, SDXL's crop conditioning.
    """
    left, top, right, bottom = (round(edge) for edge in crop_box(image.size, bucket))
    region = image if (left, top, right, bottom) == (0, 0, *image.size) else image.crop((left, top, right, bottom))
    fitted = to_rgb(region)
    if fitted.size != bucket:
        fitted = _resized(fitted, bucket)
    scale = bucket[0] / (right - left)
    return fitted, (round(top * scale), round(left * scale))


def prepare_image(
    path: Path, buckets: list[tuple[int, int]], label: str
) -> tuple[Image.Image, tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(fitted image, bucket, original (height, width) upright, crop (top, left)) of one source image."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            limit = Image.MAX_IMAGE_PIXELS  # None: the guard is turned off
            if limit is not None and width * height > limit:  # Pillow itself only warns up to twice its limit
                raise DatasetError(
                    f"{label}: {width}x{height} is {width * height} pixels, more than the {limit} "
                    "accepted (a guard against decompression bombs); downscale the image"
                )
            if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
                width, height = height, width
            bucket = nearest_bucket(width, height, buckets)
            scale = max(bucket[0] / width, bucket[1] / height)
            if scale <= 0.5:  # JPEG only: decode at 1/2, 1/4 or 1/8 scale, still covering the bucket
                image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
            ImageOps.exif_transpose(image, in_place=True)
            fitted, crop = fit_to_bucket(image, bucket)
    except DatasetError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own refusal, past twice its limit
        raise DatasetError(f"{label}: {error} Downscale the image.") from None
    except Exception as error:  # decoders raise many types; the user needs the file named
        raise DatasetError(f"{label}: not a readable image ({type(error).__name__}: {error})") from None
    return fitted, bucket, (height, width), crop


# ---------------------------------------------------------------------------------------------- sources


def _human(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _check_caps(label: str, files: int, size: int, max_files: int, max_bytes: int) -> None:
    if files > max_files:
        raise DatasetError(f"{label}: the archive holds {files} files; at most {max_files} are accepted")
    if size > max_bytes:
        raise DatasetError(f"{label}: the archive unpacks to {_human(size)}; at most {_human(max_bytes)} are accepted")


def _extract_zip(archive: Path, root: Path, label: str, max_files: int, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as bundle:
        members = bundle.infolist()
        _check_caps(label, len(members), sum(member.file_size for member in members), max_files, max_bytes)
        for member in members:
            target = (root / member.filename).resolve()
            if not target.is_relative_to(root) or member.filename.startswith(("/", "\\")):
                raise DatasetError(f"{label}: member {member.filename!r} points outside the archive")
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise DatasetError(f"{label}: member {member.filename!r} is a symbolic link")
        # zipfile stops each member at its declared size (and fails its CRC past it): the total checked above
        # bounds what is written, whatever a crafted archive claims
        for member in members:
            target = root / member.filename
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with bundle.open(member) as source, target.open("wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError) as error:
                raise DatasetError(f"{label}: member {member.filename!r} cannot be extracted ({error})") from None


def _extract_tar(archive: Path, root: Path, label: str, max_files: int, max_bytes: int) -> None:
    with tarfile.open(archive) as bundle:
        members = bundle.getmembers()
        _check_caps(label, len(members), sum(member.size for member in members), max_files, max_bytes)
        for member in members:
            try:
                member.name.encode("utf-8")
            except UnicodeEncodeError:
                shown = member.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                raise DatasetError(f"{label}: member name {shown!r} is not valid UTF-8; rename the file") from None
        try:
            # The "data" filter refuses absolute paths, "..", links out of the tree and device files.
            bundle.extractall(root, filter="data")
        except tarfile.FilterError as error:
            raise DatasetError(f"{label}: {error}") from None


def safe_extract(
    archive: Path,
    destination: Path,
    label: str | None = None,
    max_files: int = MAX_ARCHIVE_FILES,
    max_bytes: int = MAX_ARCHIVE_BYTES,
) -> None:
    """Extract a zip or tar(.gz/.bz2/.xz) into `destination`: members landing outside it, links, more than
    `max_files` members or more than `max_bytes` unpacked are refused. Errors name `label` (the archive's
    name by default) and the member."""
    label = label or archive.name
    root = destination.resolve()
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, root, label, max_files, max_bytes)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, root, label, max_files, max_bytes)
        else:
            raise DatasetError(f"{label}: not a .zip, .tar or .tar.gz archive")
    except (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, lzma.LZMAError, zlib.error, EOFError) as error:
        raise DatasetError(f"{label}: a damaged archive ({type(error).__name__}: {error})") from None


def _scrubbed(text: str, url: str) -> str:
    """`text` without the URL's credentials (requests puts the path and query string in its messages)."""
    parts = urlsplit(url)
    for secret in (parts.query, parts.netloc.rpartition("@")[0], parts.fragment):
        if secret:
            text = text.replace(secret, "…")
    return text


def _download(url: str, folder: Path, validators: dict[str, str]) -> tuple[Path, str, dict[str, str]] | None:
    """Stream `url` into a temporary file in `folder`, hashing it: (file, sha256, the answer's validators),
    or None when the server says the content is unchanged since `validators`. A broken-off transfer leaves
    no file."""
    import requests

    shown = redacted_source(url)
    headers = {}
    if validators.get("etag"):
        headers["If-None-Match"] = validators["etag"]
    if validators.get("lastModified"):
        headers["If-Modified-Since"] = validators["lastModified"]
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=folder, prefix=".download-")
    temp = Path(name)
    try:
        with os.fdopen(handle, "wb") as out, requests.get(url, stream=True, timeout=(30, 120), headers=headers) as response:
            if response.status_code == 304 and headers:
                temp.unlink()
                return None
            if response.status_code != 200:
                raise DatasetError(f"train.dataset.source {shown!r}: download failed with HTTP {response.status_code}")
            digest, size = hashlib.sha256(), 0
            for chunk in response.iter_content(chunk_size=_CHUNK):
                size += len(chunk)
                if size > MAX_ARCHIVE_BYTES:
                    raise DatasetError(f"train.dataset.source {shown!r}: more than {_human(MAX_ARCHIVE_BYTES)}")
                digest.update(chunk)
                out.write(chunk)
            answered = {"etag": response.headers.get("ETag"), "lastModified": response.headers.get("Last-Modified")}
        return temp, digest.hexdigest(), {key: value for key, value in answered.items() if value}
    except requests.RequestException as error:
        temp.unlink(missing_ok=True)
        reason = _scrubbed(f"{type(error).__name__}: {error}", url)
        raise DatasetError(f"train.dataset.source {shown!r}: download failed ({reason})") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _extract_once(archive: Path, sha256: str, paths: RunPaths, label: str) -> Path:
    """The archive's contents under datasets/sources/<sha256>: extracted on first sight, then re-used."""
    extracted = paths.datasets / "sources" / sha256[:32]
    if extracted.is_dir():
        return extracted
    extracted.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=extracted.parent, prefix=f".{sha256[:32]}."))
    try:
        safe_extract(archive, temp, label)
        os.rename(temp, extracted)
    except OSError:
        if not extracted.is_dir():  # another process renamed its copy first: theirs is as good
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return extracted


def _fetch_archive(url: str, paths: RunPaths) -> Path:
    """The extracted contents of the archive that `url` serves now (downloaded only when it changed)."""
    shown = redacted_source(url)
    # What the URL served last time; the file name is a hash, so a signed query string is never written down.
    record_file = paths.datasets / "urls" / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.json"
    record = read_json(record_file) or {}
    previous = paths.datasets / "sources" / record["sha256"][:32] if "sha256" in record else None
    if previous is not None and not previous.is_dir():
        previous = None
    try:
        fetched = _download(url, paths.datasets / "downloads", record.get("validators", {}) if previous else {})
    except DatasetError as error:
        if previous is None:
            raise
        print(f"dataset: {error}; using what {shown} served before (sha256 {record['sha256'][:16]})", file=sys.stderr, flush=True)
        return previous
    if fetched is None:  # 304 Not Modified: an answer to the validators of `previous`
        if previous is None:
            raise DatasetError(f"{shown}: the server answered 304 Not Modified to a request without validators")
        return previous
    archive, sha256, validators = fetched
    try:
        extracted = _extract_once(archive, sha256, paths, shown)
    finally:
        archive.unlink(missing_ok=True)
    atomic_write_json(record_file, {"source": shown, "sha256": sha256, "validators": validators})
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
    except Exception as error:  # hub errors are many types; the user needs one line
        raise DatasetError(
            f"train.dataset.source {dataset.source!r}: no such folder here, and the Hugging Face dataset "
            f"{repo_id!r} could not be downloaded ({type(error).__name__}: {error})"
        ) from error
    return Path(folder)


def _local_folder(source: str, paths: RunPaths) -> Path:
    """The folder a path names. On a lorastack pod only the volume holds the user's files: a relative path is
    on the volume, and a path that leads off it is refused."""
    local = Path(source).expanduser()
    if os.environ.get(ENV_MANAGED) != "1":
        return local
    volume = paths.root.resolve()
    resolved = (volume / local).resolve()
    if not resolved.is_relative_to(volume):
        raise DatasetError(
            f"train.dataset.source {source!r}: on a pod a folder must be on the volume ({paths.root}); "
            "copy the dataset there, or give an http(s) archive URL or a Hugging Face dataset id"
        )
    return resolved


def resolve_source(dataset: DatasetSpec, paths: RunPaths) -> Path:
    """The local folder holding the dataset's images, downloading it first when it is remote."""
    source = dataset.source
    kind = classify_source(source)
    if kind == "url":
        return _fetch_archive(source, paths)
    if kind == "hub" and source.startswith("hf://"):
        return _fetch_hub_dataset(source.removeprefix("hf://"), dataset, paths)
    local = _local_folder(source, paths)
    if local.is_dir():
        return local
    if kind == "hub":
        return _fetch_hub_dataset(source, dataset, paths)
    raise DatasetError(
        f"train.dataset.source {source!r}: not a folder, not an http(s) archive URL, not a Hugging Face dataset id"
    )


# --------------------------------------------------------------------------------------------- captions


def read_text(path: Path, label: str) -> str:
    """A caption or metadata file's text: UTF-8 (a byte-order mark dropped) or UTF-16 with its mark."""
    data = path.read_bytes()
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{label}: not UTF-8 text (byte {error.start} is {data[error.start:error.start + 1]!r}); save it as UTF-8"
        ) from None


def _metadata_captions(files: DatasetFiles, caption_column: str, shown: str) -> dict[str, str]:
    """Captions from Hugging Face imagefolder metadata files (a `file_name` column relative to the file)."""
    captions: dict[str, str] = {}
    for metadata in files.metadata:
        label = f"{metadata} in {shown}"
        text = read_text(files.folder / metadata, label)
        base = posixpath.dirname(metadata)
        if metadata.endswith(".jsonl"):
            rows = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise DatasetError(f"{label}, line {number}: not JSON ({error.msg})") from None
        else:
            try:
                rows = list(csv.DictReader(text.splitlines()))
            except csv.Error as error:
                raise DatasetError(f"{label}: not CSV ({error})") from None
        for row in rows:
            if isinstance(row, dict) and "file_name" in row and caption_column in row:
                captions[posixpath.normpath(posixpath.join(base, str(row["file_name"])))] = str(row[caption_column])
    return captions


def with_trigger(caption: str, trigger_word: str | None) -> str:
    if not trigger_word or caption == trigger_word or caption.startswith(f"{trigger_word},"):
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word


def collect(files: DatasetFiles, dataset: DatasetSpec, trigger_word: str | None) -> list[tuple[str, str]]:
    """(image, final caption) pairs in the files' (sorted, stable) order; images relative to the folder."""
    shown = redacted_source(dataset.source)
    metadata = _metadata_captions(files, dataset.caption_column, shown)
    pairs = []
    for image in files.images:
        if image in files.captions:
            caption = read_text(files.folder / files.captions[image], f"{files.captions[image]} in {shown}")
        else:
            caption = metadata.get(image, dataset.default_caption)
        pairs.append((image, with_trigger(caption.strip(), trigger_word)))
    return pairs


# -------------------------------------------------------------------------------------------- preparing


def data_hash(files: DatasetFiles, spec: TrainSpec, paths: RunPaths) -> str:
    """Hash of the folder's content (contract.dataset.content_hash) and of the settings that shape the
    prepared images and captions."""
    settings = {
        "version": PREPARE_VERSION,
        "resolution": spec.resolution,
        "aspectBuckets": spec.aspect_buckets,
        "triggerWord": spec.trigger_word,
        "captionColumn": spec.dataset.caption_column,
    }
    content = content_hash(files, spec.dataset.default_caption, cache_dir=paths.cache / "file-hashes")
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + content.encode()).hexdigest()[:20]


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


def default_workers() -> int:
    """Threads preparing images: Pillow and torch decode, resize and encode without holding the GIL."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def prepare_dataset(spec: TrainSpec, paths: RunPaths, workers: int | None = None) -> PreparedDataset:
    """The prepared dataset for this spec: re-used from the volume when an earlier run made it.

    Images are prepared by `workers` threads (default: the CPUs this process may use, at most 8); each
    holds one image at a time, so memory stays bounded by the workers and the target resolution.
    """
    folder = resolve_source(spec.dataset, paths)
    shown = redacted_source(spec.dataset.source)
    files = dataset_files(folder, spec.dataset.caption_extension)
    if not files.images:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DatasetError(f"train.dataset.source {shown!r}: no images ({extensions}) found")
    key = data_hash(files, spec, paths)
    final = paths.datasets / key
    if (final / "manifest.json").is_file():
        return _load_manifest(final, reused=True)

    pairs = collect(files, spec.dataset, spec.trigger_word)
    buckets = aspect_buckets(spec.resolution) if spec.aspect_buckets else [(spec.resolution, spec.resolution)]
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}."))

    def prepare(index: int) -> dict:
        source, caption = pairs[index]
        fitted, bucket, original_size, crop = prepare_image(folder / source, buckets, f"{source} in {shown}")
        sample_id = f"{index:06d}"
        # BMP: lossless and written in ~2 ms; PNG's filtering and deflate cost ~70 ms a 1024-px image
        fitted.save(temp / "images" / f"{sample_id}.bmp")
        return {
            "id": sample_id,
            "file": f"images/{sample_id}.bmp",
            "source": source,
            "caption": caption,
            "bucket": list(bucket),
            "originalSize": list(original_size),
            "cropTopLeft": list(crop),
        }

    pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="prepare")
    torch_threads = torch.get_num_threads()
    try:
        (temp / "images").mkdir()
        # one thread per image: torch's resize would otherwise start a thread team per worker (oversubscribed)
        torch.set_num_threads(1)
        samples = list(pool.map(prepare, range(len(pairs))))
        atomic_write_json(temp / "manifest.json", {"dataHash": key, "samples": samples})
        os.rename(temp, final)
    except OSError:
        if not (final / "manifest.json").is_file():  # a concurrent run finished first: use its copy
            raise
    finally:
        pool.shutdown(cancel_futures=True)  # after an error: the images not yet started are not prepared
        torch.set_num_threads(torch_threads)
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

