"""A dataset folder on the machine that runs `make check` and `pulumi up`: which sources name one, and whether it
is there. Every backend reads it the same way: RunPod uploads it to the volume (runpod_backend/uploads.py),
Replicate zips it. A source names such a folder when it is a path outside the volume's mount (/workspace):
absolute, or relative to the project root (a bare `owner/name` only when that folder exists here; otherwise it
is a Hugging Face dataset). Paths under /workspace are folders already on the volume, read by the pod.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from contract.dataset import DatasetError, classify_source
from contract.spec import WORKSPACE_MOUNT
from infra.paths import REPO_ROOT


def local_folder(source: str, project_root: Path = REPO_ROOT) -> Path | None:
    """The folder on this machine that `source` names, or None when it names something else (a URL, a Hugging
    Face dataset, a folder already on the volume). The folder need not exist: callers report that."""
    try:
        kind = classify_source(source)
    except DatasetError:
        return None  # a scheme no one reads: the schema's and the trainer's checks say so
    if kind == "url":
        return None
    path = Path(source).expanduser()
    if path.is_absolute():
        mount = PurePosixPath(WORKSPACE_MOUNT)
        return None if PurePosixPath(path.as_posix()).is_relative_to(mount) else path
    candidate = project_root / path
    if kind == "hub":  # `owner/name`: a Hub dataset unless such a folder exists here
        return candidate if candidate.is_dir() else None
    return candidate


def missing_folder_problem(source: str, project_root: Path = REPO_ROOT) -> str | None:
    """The message for a local dataset folder that is not there (None when it is, or `source` is not one)."""
    folder = local_folder(source, project_root)
    if folder is None or folder.is_dir():
        return None
    what = "is not a folder" if folder.exists() else "does not exist"
    return (f"train.dataset.source {source!r}: {folder} {what} on this machine; a local dataset is a folder of "
            f"images with same-named captions (absolute, or relative to {project_root}), uploaded to the network "
            f"volume by `pulumi up`. A folder already on the volume is a path under {WORKSPACE_MOUNT}/")


def dataset_folder_problem(source: str, project_root: Path = REPO_ROOT) -> str | None:
    """Why the folder `train.dataset.source` names cannot be read, or None: a folder on the volume may not climb
    out of it with `..`; a folder on this machine must exist."""
    try:
        kind = classify_source(source)
    except DatasetError:
        return None  # the schema's own check of the source says why
    path = PurePosixPath(source)
    if kind == "folder" and path.is_relative_to(WORKSPACE_MOUNT) and ".." in path.parts:
        return (f"train.dataset.source {source!r}: '..' leads off the volume; a folder on the volume is a path "
                f"under {WORKSPACE_MOUNT}/ (like {WORKSPACE_MOUNT}/datasets/my-style)")
    return missing_folder_problem(source, project_root)
