"""The layout of the network volume, shared by the trainer, the emulator, `make status` and `make fetch`.

/workspace/
  hf/                          HF_HOME: base models downloaded once, reused by every later run
  datasets/<content-hash>/     prepared datasets, keyed by content
  cache/<key>/                 VAE latents and text embeddings, keyed by model, resolution and data hash
  runs/<run-id>/
    status.json                progress, written atomically as training goes
    checkpoints/step-<n>/      complete checkpoints only (written to a temp name, then renamed)
    lora/                      the trained LoRA: diffusers and kohya .safetensors
    DONE                       marker: the run finished; a restarted pod does not train again
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from contract.spec import ENV_WORKSPACE, WORKSPACE_MOUNT


def workspace_root(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get(ENV_WORKSPACE, WORKSPACE_MOUNT))


@dataclass(frozen=True)
class RunPaths:
    root: Path  # the volume
    run_id: str

    @property
    def hf_home(self) -> Path:
        return self.root / "hf"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def run(self) -> Path:
        return self.root / "runs" / self.run_id

    @property
    def status(self) -> Path:
        return self.run / "status.json"

    @property
    def checkpoints(self) -> Path:
        return self.run / "checkpoints"

    @property
    def lora(self) -> Path:
        return self.run / "lora"

    @property
    def done(self) -> Path:
        return self.run / "DONE"


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write then rename: a reader (or a resumed pod) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as out:
        out.write(data)


def atomic_write_json(path: Path, value: object) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode())


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
