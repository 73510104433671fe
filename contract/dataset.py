"""What a dataset is, for the trainer and both backends: its files, its content hash, its source's kind, and
the form of its source that may be written down.

A dataset folder holds images with same-named caption files (kohya convention) and, for Hugging Face
imagefolder datasets, `metadata.jsonl`/`metadata.csv` caption files. Its content hash covers those files by
relative path and bytes, so the same images and captions are the same dataset wherever they come from (a
folder, an archive behind any URL, a Hub snapshot), and a changed byte is a new dataset.

Hashing is cheap the second time: each file's sha256 is remembered against its (size, mtime, ctime, inode)
in a small JSON file in a cache folder, so an unchanged folder is decided from `stat` calls alone.

A source URL may carry credentials (user:password@, a signed query string): `redacted_source` and
`with_redacted_source` give what status files, logs, LoRA metadata, model cards and trackers may record.

Torch-free and Pillow-free: `infra/` imports it, and `pulumi preview` must not load an imaging stack.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from contract.spec import TrainSpec
from contract.workspace import atomic_write_json

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder captions
SKIPPED_FOLDERS = ("__MACOSX",)  # macOS zip side files; names starting with "." are skipped too
HASH_FORMAT = 1  # part of every content hash: a change to what is hashed must not match old hashes
# A file changed within this many seconds of being hashed could change again without its mtime moving
# (coarse file-system clocks): its hash is used but not remembered.
_RACY_SECONDS = 2.0
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

SourceKind = Literal["folder", "url", "hub"]


class DatasetError(ValueError):
    """A dataset that cannot be used, in words a user can act on (naming the file at fault)."""


# ---------------------------------------------------------------------------------------------- sources


def classify_source(source: str) -> SourceKind:
    """What `train.dataset.source` names: "url" (http/https archive), "hub" (Hugging Face dataset) or "folder".

    `hf://owner/name` and a bare `owner/name` are Hub ids; a caller with a file system prefers an existing
    folder of that bare name (write `./owner/name` to mean the folder). Raises DatasetError for sources the
    trainer cannot read (file://, s3://, ftp://, any other scheme), naming the key and what is allowed.
    """
    scheme = _SCHEME.match(source)
    if scheme is None:
        return "hub" if _HUB_ID.match(source) and not source.startswith(".") else "folder"
    name = scheme.group(1).lower()
    shown = redacted_source(source)
    if name in ("http", "https"):
        if not urlsplit(source).hostname:
            raise DatasetError(f"train.dataset.source {shown!r}: a URL needs a host, like https://example.com/data.zip")
        return "url"
    if name == "hf":
        if not _HUB_ID.match(source[len("hf://") :]):
            raise DatasetError(f"train.dataset.source {shown!r}: a Hugging Face dataset is hf://owner/name")
        return "hub"
    if name == "file":
        hint = "give the folder as a plain path (on a pod: a folder on the volume, like /workspace/datasets/my-style)"
    else:
        hint = (
            f"{name}:// is not supported; use an http(s) URL of a .zip/.tar/.tar.gz (a presigned or public "
            "bucket URL works), a Hugging Face dataset id or a folder"
        )
    raise DatasetError(f"train.dataset.source {shown!r}: {hint}")


def redacted_source(source: str) -> str:
    """The source with a URL's credentials removed (user:password@, the query string, the fragment): the form
    to record in status files, logs, LoRA metadata and model cards. Paths and Hub ids come back unchanged."""
    if _SCHEME.match(source) is None:
        return source
    parts = urlsplit(source)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def with_redacted_source(spec: TrainSpec) -> TrainSpec:
    """The spec with its dataset source redacted: what to write into LoRA metadata, model cards, trackers."""
    dataset = spec.dataset.model_copy(update={"source": redacted_source(spec.dataset.source)})
    return spec.model_copy(update={"dataset": dataset})


# ------------------------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class DatasetFiles:
    """A dataset folder's files, as POSIX paths relative to `folder`, sorted."""

    folder: Path
    images: tuple[str, ...]
    captions: dict[str, str]  # image -> its caption file, for the images that have one
    metadata: tuple[str, ...]  # imagefolder metadata.jsonl / metadata.csv files

    def all_files(self) -> list[str]:
        return sorted({*self.images, *self.captions.values(), *self.metadata})


def _checked_name(folder: Path, relative: str) -> str:
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        shown = relative.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise DatasetError(f"{folder / shown}: the file name is not valid UTF-8; rename the file") from None
    return relative


def dataset_files(folder: Path, caption_extension: str = ".txt") -> DatasetFiles:
    """The images, their caption files and the metadata files under `folder` (hidden files and folders and
    macOS `__MACOSX` side folders skipped)."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    names: set[str] = set()
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".") and name not in SKIPPED_FOLDERS]
        base = Path(directory).relative_to(folder)
        for name in files:
            if not name.startswith("."):
                names.add(_checked_name(folder, (base / name).as_posix()))
    images = tuple(sorted(name for name in names if Path(name).suffix.lower() in IMAGE_EXTENSIONS))
    captions = {}
    for image in images:
        caption = Path(image).with_suffix(caption_extension).as_posix()
        if caption in names and caption != image:
            captions[image] = caption
    metadata = tuple(sorted(name for name in names if Path(name).name in METADATA_FILES))
    return DatasetFiles(folder, images, captions, metadata)


# ------------------------------------------------------------------------------------------------- hash


def default_hash_cache() -> Path:
    """Where remembered file hashes live on a user's machine: $XDG_CACHE_HOME/lorastack/file-hashes."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorastack" / "file-hashes"


class _FileHashes:
    """sha256 of files under one folder, remembered against (size, mtime_ns, ctime_ns, inode)."""

    def __init__(self, folder: Path, cache_dir: Path | None):
        self.folder = folder
        self.started_ns = time.time_ns()
        key = hashlib.sha256(str(folder.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:32]
        self.cache_file = (cache_dir or default_hash_cache()) / f"{key}.json"
        self.known: dict[str, list] = {}
        self.seen: dict[str, list] = {}
        try:
            stored = json.loads(self.cache_file.read_text())
            if stored.get("format") == HASH_FORMAT:
                self.known = stored["files"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no cache yet, or a damaged one: every file is read once more

    def sha256(self, relative: str) -> str:
        path = self.folder / relative
        try:
            stat = path.stat()
            stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
            known = self.known.get(relative)
            if known is not None and known[:4] == stamp:
                digest = known[4]
            else:
                with path.open("rb") as handle:
                    digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as error:
            raise DatasetError(f"{path}: cannot be read ({error.strerror or error})") from None
        if max(stat.st_mtime_ns, stat.st_ctime_ns) < self.started_ns - _RACY_SECONDS * 1e9:
            self.seen[relative] = [*stamp, digest]
        return digest

    def save(self) -> None:
        if self.seen != self.known:
            try:
                atomic_write_json(self.cache_file, {"format": HASH_FORMAT, "folder": str(self.folder), "files": self.seen})
            except OSError:
                pass  # a read-only cache only costs speed: the next look reads the files again


def content_hash(files: DatasetFiles, default_caption: str = "", cache_dir: Path | None = None) -> str:
    """sha256 (hex) of a dataset: every image, caption and metadata file by relative path and bytes, and the
    default caption that images without a caption file get. Hidden files and file times do not count.
    `cache_dir` holds the remembered file hashes (default: the user's cache folder)."""
    hashes = _FileHashes(files.folder, cache_dir)
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": HASH_FORMAT, "defaultCaption": default_caption}).encode() + b"\n")
    for relative in files.all_files():
        digest.update(relative.encode() + b"\0" + hashes.sha256(relative).encode() + b"\n")
    hashes.save()
    return digest.hexdigest()


def folder_content_hash(
    folder: Path, caption_extension: str = ".txt", default_caption: str = "", cache_dir: Path | None = None
) -> str:
    """content_hash of the dataset in `folder` (captions in same-named `caption_extension` files)."""
    return content_hash(dataset_files(folder, caption_extension), default_caption, cache_dir)
