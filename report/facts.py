"""The facts a run's report states besides its pictures, and where they come from.

Callers know some (the stack, the backend and GPU, the billed cost); the run folder knows the rest:
status.json (state, steps, cost so far), history.jsonl (dataset hash and file count, the trainer's time)
and the LoRA file's own metadata (the whole training spec). `complete_facts` fills what a caller left
None from the folder; what neither knows is shown as "—".
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from contract.history import HISTORY_FILE, read_history
from contract.spec import TrainSpec
from contract.workspace import read_json

STATUS_FILE = "status.json"
SPEC_METADATA_KEY = "lorastack.spec"  # training/export.py writes the spec into every LoRA file it makes
DATA_HASH_METADATA_KEY = "lorastack.data_hash"
_LARGEST_HEADER = 100 * 1024 * 1024  # a safetensors header past this is not one


@dataclass(frozen=True)
class RunFacts:
    """What the report page states about a run. Every key may be None (or empty): unknown, shown as "—".

    stack          the stack's name ("local" for make train-local)
    backend        "runpod", "replicate" or "local"
    gpu            what trained: e.g. "NVIDIA GeForce RTX 4090 x1", "gpu-h100", "CPU"
    run_id         the run's directory name on the volume (runs/<run_id>/)
    state          status.json's state: succeeded, failed, limit, stalled, interrupted, running
    base_model     Hugging Face id or path of the base model
    family         sd15, sdxl, flux or sd35
    steps_done     optimizer steps done; steps_total: steps planned (the spec's `steps`)
    wall_seconds   the run's wall time (callers: from the backend's start and end; else the trainer's time)
    cost_usd       the billed cost (callers: the backend's bill; else status.json's cost_usd)
    data_hash      content hash of the prepared dataset; dataset_files: its number of images
    settings       label -> value of the settings that matter (settings_from_spec), in display order
    """

    stack: str | None = None
    backend: str | None = None
    gpu: str | None = None
    run_id: str | None = None
    state: str | None = None
    base_model: str | None = None
    family: str | None = None
    steps_done: int | None = None
    steps_total: int | None = None
    wall_seconds: float | None = None
    cost_usd: float | None = None
    data_hash: str | None = None
    dataset_files: int | None = None
    settings: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: TrainSpec, **known) -> RunFacts:
        """Facts with base model, family, planned steps and settings taken from the spec; `known` adds the rest."""
        from_spec = {
            "base_model": spec.base_model,
            "family": spec.family,
            "steps_total": spec.steps,
            "settings": settings_from_spec(spec),
        }
        return cls(**{**from_spec, **known})


def _number(value: float) -> str:
    return f"{value:g}"


def settings_from_spec(spec: TrainSpec) -> dict[str, str]:
    """The settings a person compares two LoRAs by, as display strings."""
    learning_rate = _number(spec.learning_rate)
    if spec.lr_scheduler != "constant" or spec.warmup_steps:
        learning_rate += f" ({spec.lr_scheduler}, {spec.warmup_steps} warmup steps)"
    text_encoder = "not trained"
    if spec.train_text_encoder:
        text_encoder = f"trained, lr {_number(spec.text_encoder_learning_rate or spec.learning_rate)}"
    settings = {
        "rank": str(spec.rank),
        "alpha": _number(spec.lora_alpha),
        "learning rate": learning_rate,
        "resolution": f"{spec.resolution} px" + (" (aspect buckets)" if spec.aspect_buckets else ""),
        "batch": f"{spec.batch_size} x {spec.gradient_accumulation} accumulation"
        if spec.gradient_accumulation > 1
        else str(spec.batch_size),
        "precision": spec.precision,
        "text encoder": text_encoder,
        "trigger word": spec.trigger_word or "—",
        "seed": str(spec.seed),
    }
    if spec.min_snr_gamma is not None:
        settings["min-SNR gamma"] = _number(spec.min_snr_gamma)
    if spec.noise_offset:
        settings["noise offset"] = _number(spec.noise_offset)
    return settings


def lora_folder(folder: Path) -> Path:
    """Where a run copy keeps its LoRA files: lora/ in a run directory, or the folder itself (make fetch)."""
    return folder / "lora" if (folder / "lora").is_dir() else folder


def lora_files(folder: Path) -> list[Path]:
    return sorted(lora_folder(folder).glob("*.safetensors"))


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` strings of a .safetensors file: its header is an 8-byte length and then JSON."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _LARGEST_HEADER:
                return {}
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(key): str(value) for key, value in metadata.items()} if isinstance(metadata, dict) else {}


def _spec_from_lora_files(folder: Path) -> tuple[TrainSpec | None, str | None]:
    for path in lora_files(folder):
        metadata = safetensors_metadata(path)
        if SPEC_METADATA_KEY in metadata:
            try:
                return TrainSpec.model_validate_json(metadata[SPEC_METADATA_KEY]), metadata.get(DATA_HASH_METADATA_KEY)
            except ValueError:  # written by a lorastack whose schema differs from this one's
                return None, metadata.get(DATA_HASH_METADATA_KEY)
    return None, None


def complete_facts(facts: RunFacts, folder: Path) -> RunFacts:
    """`facts` with every unknown (None or empty) key filled from the run folder where it says."""
    status = read_json(folder / STATUS_FILE) or {}
    history = read_history(folder / HISTORY_FILE)
    spec, data_hash = _spec_from_lora_files(folder)
    from_spec = dataclasses.asdict(RunFacts.from_spec(spec)) if spec is not None else {}
    found = {
        **from_spec,
        "run_id": status.get("run_id"),
        "state": status.get("state"),
        "steps_done": status.get("step", history.steps[-1].step if history.steps else None),
        "steps_total": status.get("total", from_spec.get("steps_total")),
        "wall_seconds": history.training_seconds or None,
        "cost_usd": status.get("cost_usd"),
        "data_hash": history.data_hash or data_hash,
        "dataset_files": history.dataset_files,
    }
    missing = {
        name: value
        for name, value in found.items()
        if value is not None and getattr(facts, name) in (None, {}, "")
    }
    return dataclasses.replace(facts, **missing)
