"""A dataset folder on this machine, sent to the network volume through RunPod's S3 API (infra/runpod_backend/s3.py).

`train.dataset.source` names a local folder when it is a path outside the volume's mount (/workspace): absolute,
or relative to the project root. Such a folder is identified by its content hash (contract.dataset, the same hash
the Replicate backend and the trainer use) and lands on the volume under `datasets/uploads/<hash>/`; the pod's
spec points there, so the pod trains on exactly that content and a changed folder is a new run id.

The upload rule (`upload`): a manifest object `datasets/uploads/<hash>.json`, written last, says an upload is
complete and lists each file's size and sha256, so a second `up` of the same folder sends nothing. Otherwise the
files already under the prefix (ListObjectsV2) are kept when their size matches (an S3 object appears whole or
not at all): an interrupted upload resumes without resending what finished. A file whose bytes an earlier upload
on the volume holds (its manifest says so) is copied there on the volume (CopyObject): a changed folder sends only
its new and changed files. The rest are sent, in 64 MB multipart parts. Multipart uploads an interruption left
open under the prefix are aborted first (RunPod keeps their parts on the volume until then). Progress (files,
bytes, rate) goes to stderr: the provider host's output, which `pulumi up` shows.

Pulumi-free: `make check`, `make status|fetch` and the bench import it; the Pulumi resource is dataset.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from contract.dataset import DatasetError, content_hash, dataset_files
from contract.spec import WORKSPACE_MOUNT, TrainSpec
from infra.local_dataset import local_folder, missing_folder_problem
from infra.paths import REPO_ROOT
from infra.runpod_backend import s3 as runpod_s3

UPLOADS_DIR = "datasets/uploads"  # on the volume, beside the trainer's prepared datasets/<hash>/
MANIFEST_FORMAT = 1
PARALLEL_FILES = 8  # small files are latency-bound: several in flight at once


@dataclass(frozen=True)
class LocalDataset:
    """A dataset folder here: its content hash and the files that hash covers, with their sizes."""

    folder: Path
    content_hash: str
    files: tuple[tuple[str, int], ...]  # (path relative to the folder, POSIX; bytes), sorted

    @property
    def file_count(self) -> int:
        return len(self.files)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def prefix(self) -> str:
        """The S3 key prefix, i.e. the folder on the volume relative to its root."""
        return f"{UPLOADS_DIR}/{self.content_hash}/"

    @property
    def manifest_key(self) -> str:
        return f"{UPLOADS_DIR}/{self.content_hash}.json"

    @property
    def volume_path(self) -> str:
        """Where the pod finds it."""
        return f"{WORKSPACE_MOUNT}/{self.prefix.rstrip('/')}"

    def describe(self) -> str:
        return f"{self.file_count} files, {_megabytes(self.total_bytes)}, content hash {self.content_hash[:16]}"


def scan(folder: Path, caption_extension: str = ".txt", default_caption: str = "",
         cache_dir: Path | None = None) -> LocalDataset:
    """Hash the folder (unchanged files are decided from `stat` alone: contract.dataset's cache)."""
    files = dataset_files(folder, caption_extension)
    digest = content_hash(files, default_caption, cache_dir)
    sizes = []
    for relative in files.all_files():
        try:
            sizes.append((relative, (folder / relative).stat().st_size))
        except OSError as error:
            raise DatasetError(f"{folder / relative}: cannot be read ({error.strerror or error})") from None
    return LocalDataset(folder, digest, tuple(sizes))


def scan_spec(spec: TrainSpec, project_root: Path = REPO_ROOT) -> LocalDataset | None:
    """The spec's local dataset folder, scanned; None when its source is not a local folder."""
    folder = local_folder(spec.dataset.source, project_root)
    if folder is None:
        return None
    problem = missing_folder_problem(spec.dataset.source, project_root)
    if problem:
        raise DatasetError(f"lorastack:{problem}")
    return scan(folder, spec.dataset.caption_extension, spec.dataset.default_caption)


def pod_spec(spec: TrainSpec, dataset: LocalDataset | None) -> TrainSpec:
    """The spec the pod receives: a local dataset's source becomes its content-addressed folder on the volume."""
    if dataset is None:
        return spec
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"source": dataset.volume_path})})


def spec_for_pod(spec: TrainSpec, project_root: Path = REPO_ROOT) -> TrainSpec:
    """`pod_spec` of the stack's spec, scanning its local folder if it has one (make status / fetch: the run id)."""
    return pod_spec(spec, scan_spec(spec, project_root))


# --- the upload -------------------------------------------------------------------------------------------------

COPY_LIMIT_BYTES = 5 * 1024**3  # CopyObject's limit; past it a file is sent again (RunPod has no UploadPartCopy)


@dataclass(frozen=True)
class UploadResult:
    files_sent: int
    bytes_sent: int
    files_copied: int  # copied on the volume from an earlier upload holding the same bytes (nothing sent)
    files_kept: int  # already there from an earlier, interrupted upload of this content
    complete_before: bool  # the manifest was there: nothing was looked at or sent


class UploadProgress:
    """Files and bytes sent and the rate, as a line on `stream` at most every `interval_s` (and at the end)."""

    def __init__(self, label: str, total_files: int, total_bytes: int, stream: TextIO | None = None,
                 interval_s: float = 1.0, clock=time.monotonic):
        self.label, self.total_files, self.total_bytes = label, total_files, total_bytes
        self.stream, self.interval_s, self.clock = stream or sys.stderr, interval_s, clock
        self.files = self.bytes = 0
        self.started = self.last_shown = clock()
        self._lock = threading.Lock()

    def add_bytes(self, count: int) -> None:
        with self._lock:
            self.bytes += count
            self._maybe_show()

    def file_done(self) -> None:
        with self._lock:
            self.files += 1
            self._maybe_show()

    def _maybe_show(self) -> None:
        if self.clock() - self.last_shown >= self.interval_s:
            self.show()

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        return (f"{self.label}: {self.files}/{self.total_files} files, {_megabytes(self.bytes)} of "
                f"{_megabytes(self.total_bytes)}, {_megabytes(self.bytes / elapsed)}/s")

    def show(self) -> None:
        self.last_shown = self.clock()
        print(self.line(), file=self.stream, flush=True)


def _megabytes(count: float) -> str:
    return f"{count / 1e6:.1f} MB"


def _not_found(error) -> bool:
    return error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound")


def read_manifest(s3, bucket: str, key: str) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if _not_found(error):
            return None
        raise
    try:
        manifest = json.loads(body)
    except ValueError:
        return None  # a damaged manifest counts as none: the files are looked at again
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def is_complete(s3, bucket: str, dataset: LocalDataset) -> bool:
    """The manifest is written last: its presence, with this hash, means every file is there."""
    manifest = read_manifest(s3, bucket, dataset.manifest_key)
    return manifest is not None and manifest.get("contentHash") == dataset.content_hash


def uploaded_files(s3, bucket: str) -> dict[str, tuple[str, int]]:
    """{sha256: (key, bytes)} of every file of every complete upload on the volume (their manifests)."""
    known: dict[str, tuple[str, int]] = {}
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{UPLOADS_DIR}/", Delimiter="/")
    for page in pages:
        for item in page.get("Contents", []):
            if not item["Key"].endswith(".json"):
                continue
            manifest = read_manifest(s3, bucket, item["Key"])
            if manifest is None:
                continue
            prefix = f"{UPLOADS_DIR}/{manifest.get('contentHash')}/"
            for entry in manifest.get("files", []):
                if "sha256" in entry:
                    known[entry["sha256"]] = (prefix + entry["path"], entry["bytes"])
    return known


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def abort_unfinished(s3, bucket: str, prefix: str) -> int:
    """Abort the multipart uploads an interruption left open under `prefix` (their parts take volume space)."""
    aborted = 0
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted += 1
    return aborted


def upload(dataset: LocalDataset, s3, bucket: str, *, part_bytes: int = runpod_s3.PART_BYTES,
           stream: TextIO | None = None, caption_extension: str = ".txt", default_caption: str = "",
           cache_dir: Path | None = None) -> UploadResult:
    """Make `datasets/uploads/<hash>/` on the volume (bucket) hold exactly `dataset`'s files; see the module doc.

    A file whose bytes an earlier upload on this volume already holds is copied there on the volume
    (CopyObject), so a changed folder sends only its new and changed files. The folder is hashed again after
    sending: a file changed meanwhile fails the upload before its manifest is written."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError

    if is_complete(s3, bucket, dataset):
        return UploadResult(0, 0, 0, dataset.file_count, complete_before=True)
    abort_unfinished(s3, bucket, dataset.prefix)
    present = runpod_s3.list_files(s3, bucket, dataset.prefix)
    with ThreadPoolExecutor(max_workers=PARALLEL_FILES) as pool:  # hashing reads files; it releases the GIL
        digests = dict(zip((relative for relative, _ in dataset.files),
                           pool.map(lambda item: file_sha256(dataset.folder / item[0]), dataset.files), strict=True))
    missing = [(relative, size) for relative, size in dataset.files if present.get(dataset.prefix + relative) != size]
    known = uploaded_files(s3, bucket) if missing else {}
    copies: list[tuple[str, int, str]] = []  # (relative, size, the key of an identical file already uploaded)
    sends: list[tuple[str, int, None]] = []
    for relative, size in missing:
        earlier = known.get(digests[relative])
        if earlier is not None and earlier[1] == size and size < COPY_LIMIT_BYTES:
            copies.append((relative, size, earlier[0]))
        else:
            sends.append((relative, size, None))
    progress = UploadProgress(f"dataset {dataset.content_hash[:12]}", len(sends), sum(size for _, size, _ in sends),
                              stream=stream)
    transfer = TransferConfig(multipart_threshold=part_bytes, multipart_chunksize=part_bytes, max_concurrency=4)
    sent: list[tuple[str, int]] = []

    def send(relative: str) -> None:
        path = dataset.folder / relative
        s3.upload_file(str(path), bucket, dataset.prefix + relative, Config=transfer, Callback=progress.add_bytes)
        sent.append((relative, path.stat().st_size))
        progress.file_done()

    def copy(item: tuple[str, int, str]) -> bool:
        relative, _, source_key = item
        try:
            s3.copy_object(Bucket=bucket, Key=dataset.prefix + relative, CopySource={"Bucket": bucket, "Key": source_key})
        except ClientError as error:
            if not _not_found(error):
                raise
            send(relative)  # the earlier copy is gone since its manifest was read: send the file after all
            return False
        return True

    with ThreadPoolExecutor(max_workers=PARALLEL_FILES) as pool:
        copied = sum(pool.map(copy, copies))  # re-raises the first failure; what finished stays finished
        for _ in pool.map(send, [relative for relative, _, _ in sends]):
            pass
    if sends:
        progress.show()
    again = scan(dataset.folder, caption_extension, default_caption, cache_dir)
    if again.content_hash != dataset.content_hash:
        raise DatasetError(f"{dataset.folder}: files changed while they were uploaded (content hash "
                           f"{dataset.content_hash[:16]} became {again.content_hash[:16]}); run `pulumi up` again")
    manifest = {"format": MANIFEST_FORMAT, "contentHash": dataset.content_hash,
                "files": [{"path": relative, "bytes": size, "sha256": digests[relative]}
                          for relative, size in dataset.files]}
    s3.put_object(Bucket=bucket, Key=dataset.manifest_key, Body=json.dumps(manifest).encode(),
                  ContentType="application/json")
    return UploadResult(len(sent), sum(size for _, size in sent), copied, dataset.file_count - len(missing), False)
