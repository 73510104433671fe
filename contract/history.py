"""A run's history on the volume, read back by the report: every step's loss, checkpoints, restarts, samples.

runs/<id>/history.jsonl    one JSON object per line, appended, never rewritten (it survives restarts):
    {"step": 12, "loss": 0.1234, "lr": 0.0001, "time": 1764500000.1}     an optimizer step
    {"checkpoint": 250, "time": ...}                                      a complete checkpoint of step 250
    {"start": 0, "dataset": "<data hash>", "files": 40, "time": ...}      a trainer process began at step 0
    {"resume": 250, "dataset": "<data hash>", "files": 40, "time": ...}   ... or resumed from step 250
  `time` is Unix seconds. Each record is one write() of one whole line on an O_APPEND descriptor, then
  fsync: a process killed mid-write leaves at most a torn last line, which the reader skips and the next
  writer closes with a newline first. Steps after the newest checkpoint are done again after a resume;
  the reader keeps the records of the resumed attempt (the one that made the final weights).

runs/<id>/samples/         every sample step's images, all kept:
    step-000100/00-a-photo-of-sks.png     <step, 6 digits>/<prompt index, 2 digits>-<prompt slug>.png
    samples.json                          {"steps": [{"step": 100, "images": [{"file": "step-000100/00-...png",
                                                                               "prompt": "a photo of sks"}]}]}
  Images are written first, the index last (both atomically): a listed image is always complete.

Torch-free and Pillow-free (images arrive as PNG bytes): the trainer writes it, `make fetch` and the report read it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from contract.workspace import atomic_write_bytes, atomic_write_json, read_json

HISTORY_FILE = "history.jsonl"
SAMPLES_DIR = "samples"
SAMPLES_INDEX = "samples.json"
_SLUG_LENGTH = 40
_SAMPLE_NAME = re.compile(r"^step-(\d+)/(\d+)-([^/]*)\.png$")


# ------------------------------------------------------------------------------------------------ history


def history_path(run: Path) -> Path:
    return run / HISTORY_FILE


def append(path: Path, record: dict) -> None:
    """Append one record as one line (a `time` is added when missing), flushed and fsynced."""
    line = json.dumps({**record, "time": record.get("time", time.time())}, separators=(",", ":")) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(descriptor).st_size
        if size and _last_byte(path, size) != b"\n":
            line = "\n" + line  # a process was killed mid-line: close the torn line, keep ours whole
        os.write(descriptor, line.encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _last_byte(path: Path, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(size - 1)
        return handle.read(1)


def record_step(run: Path, step: int, loss: float, lr: float) -> None:
    append(history_path(run), {"step": step, "loss": float(loss), "lr": float(lr)})


def record_checkpoint(run: Path, step: int) -> None:
    append(history_path(run), {"checkpoint": step})


def record_start(run: Path, step: int, data_hash: str, files: int) -> None:
    """A trainer process begins at `step`: a fresh start at 0, else a resume from that checkpoint."""
    append(history_path(run), {"resume" if step else "start": step, "dataset": data_hash, "files": files})


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    lr: float
    time: float


@dataclass
class History:
    steps: list[StepRecord] = field(default_factory=list)  # one per step, in step order, superseded ones dropped
    checkpoints: list[int] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)
    data_hash: str | None = None
    dataset_files: int | None = None
    skipped_lines: int = 0  # torn or foreign lines the reader could not use
    process_spans: list[tuple[float, float]] = field(default_factory=list)  # (first, last) time of each process

    @property
    def training_seconds(self) -> float:
        """Seconds the trainer processes ran, from each one's start to its last record (gaps between pods excluded)."""
        return sum(last - first for first, last in self.process_spans)


def read_history(path: Path) -> History:
    """The history in `path`; an absent file is an empty history, unreadable lines are counted and skipped."""
    history = History()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return history
    steps: dict[int, StepRecord] = {}
    for line in text.splitlines():
        record = _parse(line)
        if record is None:
            history.skipped_lines += bool(line.strip())
            continue
        moment = float(record.get("time", 0.0))
        if "start" in record or "resume" in record:
            began = int(record.get("resume", record.get("start", 0)))
            if "resume" in record or history.process_spans:  # a later process of the run: a restart
                history.resumes.append(began)
            history.process_spans.append((moment, moment))
            history.data_hash = record.get("dataset", history.data_hash)
            history.dataset_files = record.get("files", history.dataset_files)
            # the lost attempt's steps and checkpoints past the restart point did not make these weights
            steps = {step: kept for step, kept in steps.items() if step <= began}
            history.checkpoints = [step for step in history.checkpoints if step <= began]
            continue
        if history.process_spans:
            first, _ = history.process_spans[-1]
            history.process_spans[-1] = (first, moment)
        if "checkpoint" in record:
            history.checkpoints.append(int(record["checkpoint"]))
        elif "step" in record and _is_number(record.get("loss")):
            step = int(record["step"])
            steps[step] = StepRecord(step, float(record["loss"]), float(record.get("lr", 0.0)), moment)
    history.steps = [steps[step] for step in sorted(steps)]
    return history


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------------ samples


@dataclass(frozen=True)
class SampleImage:
    path: Path
    prompt: str


@dataclass(frozen=True)
class SampleStep:
    step: int
    images: tuple[SampleImage, ...]  # one per prompt, in prompt order


def prompt_slug(prompt: str) -> str:
    """A filename-safe short form of a prompt (the full prompt is in samples.json)."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:_SLUG_LENGTH].rstrip("-") or "prompt"


def sample_file(step: int, index: int, prompt: str) -> str:
    """The image's path relative to samples/."""
    return f"step-{step:06d}/{index:02d}-{prompt_slug(prompt)}.png"


def save_samples(run: Path, step: int, prompts: list[str], pngs: list[bytes]) -> list[Path]:
    """Write one step's sample images (PNG bytes, in prompt order), then add them to samples.json."""
    folder = run / SAMPLES_DIR
    prompts = list(prompts) + [""] * (len(pngs) - len(prompts))
    entries, saved = [], []
    for index, (prompt, png) in enumerate(zip(prompts, pngs, strict=False)):
        relative = sample_file(step, index, prompt)
        atomic_write_bytes(folder / relative, png)
        entries.append({"file": relative, "prompt": prompt})
        saved.append(folder / relative)
    index_file = folder / SAMPLES_INDEX
    steps = [entry for entry in (read_json(index_file) or {}).get("steps", []) if entry.get("step") != step]
    steps.append({"step": step, "images": entries})
    atomic_write_json(index_file, {"steps": sorted(steps, key=lambda entry: entry["step"])})
    return saved


def read_samples(samples: Path) -> list[SampleStep]:
    """Every sample step under `samples` (a run's samples/ folder), oldest first.

    From samples.json; images present but not (yet) listed there, e.g. from a partial download, are
    found by their names, with the prompt read back from the slug.
    """
    found: dict[int, dict[int, SampleImage]] = {}
    for path in sorted(samples.glob("step-*/*.png")):
        match = _SAMPLE_NAME.match(path.relative_to(samples).as_posix())
        if match:
            step, index, slug = int(match.group(1)), int(match.group(2)), match.group(3)
            found.setdefault(step, {})[index] = SampleImage(path, slug.replace("-", " "))
    for entry in (read_json(samples / SAMPLES_INDEX) or {}).get("steps", []):
        for image in entry.get("images", []):
            match = _SAMPLE_NAME.match(str(image.get("file", "")))
            if match and (samples / image["file"]).is_file():
                step, index = int(match.group(1)), int(match.group(2))
                found.setdefault(step, {})[index] = SampleImage(samples / image["file"], str(image.get("prompt", "")))
    return [SampleStep(step, tuple(images[i] for i in sorted(images))) for step, images in sorted(found.items())]
