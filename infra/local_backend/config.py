"""The `lorastack:local` section of a stack file: the GPU in this machine, what an hour of it costs you, and the
folder that holds the run's checkpoints (bind-mounted at /workspace in the container)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from contract.spec import _Schema
from infra.local_backend.catalog import LOCAL_GPUS

DEFAULT_FOLDER = "~/.cache/lorastack"  # the stack's folder is <this>/<stack> unless the stack names one


class LocalConfig(_Schema):
    gpu_type: str  # for the memory fit and the time estimate; the container gets every GPU (`--gpus all`) or gpuCount
    gpu_count: int | Literal["all"] = "all"
    usd_per_hour: float = Field(default=0.0, ge=0, le=100)  # electricity/amortisation; 0: only maxHours limits
    folder: str | None = None  # checkpoints, model cache, datasets; default ~/.cache/lorastack/<stack>
    keep_on_destroy: bool = True  # `pulumi destroy` keeps the folder
    shm_size_gb: int = Field(default=8, ge=1, le=256)  # PyTorch's data loader shares memory through /dev/shm

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        if value not in LOCAL_GPUS:
            raise ValueError("unknown GPU name (as nvidia-smi shows it); allowed: " + ", ".join(sorted(LOCAL_GPUS)))
        return value

    @field_validator("gpu_count")
    @classmethod
    def _count(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 8:
            raise ValueError("must be 1 to 8, or all")
        return value

    @field_validator("folder")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_absolute():
            raise ValueError("must be an absolute path or start with ~ (the folder is bind-mounted into the container)")
        return value

    def folder_path(self, stack: str) -> Path:
        return Path(self.folder or f"{DEFAULT_FOLDER}/{stack}").expanduser()

    @property
    def memory_gb(self) -> int:
        return LOCAL_GPUS[self.gpu_type]
