"""A run's progress in the pod's log: one JSON object per line, written by the trainer, read by `make status`.

The trainer (training/tracking.py) prints a record after its progress updates and when it finishes; the
machine that follows the run picks them out of the log stream, between any other lines, by their marker
key. One writer and one reader, here, without torch: both sides import this module.

    {"lorastack": "progress", "state": "running", "step": 120, "total": 1000, "loss": 0.1234, ...}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MARKER_KEY = "lorastack"
MARKER = "progress"
STATES = ("running", "succeeded", "failed", "limit", "stalled", "interrupted")


@dataclass
class Progress:
    source: str  # where the numbers came from: status.json or the pod log
    state: str | None = None  # the trainer's state: running, succeeded, failed, limit, stalled, interrupted
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    seconds_per_step: float | None = None
    eta: str | None = None  # as format_duration writes it, e.g. 12m45s
    cost_usd: float | None = None


def format_duration(seconds: float) -> str:
    """1h02m, 12m45s or 7s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_record(
    state: str,
    step: int,
    total: int,
    *,
    loss: float | None = None,
    lr: float | None = None,
    seconds_per_step: float | None = None,
    eta_seconds: float | None = None,
    cost_usd: float | None = None,
    estimated_cost_usd: float | None = None,
) -> str:
    """One log line holding the run's progress (no newline). Fields that are unknown are left out."""
    if state not in STATES:
        raise ValueError(f"progress state must be one of {STATES} (got {state!r})")
    record: dict[str, object] = {MARKER_KEY: MARKER, "state": state, "step": int(step), "total": int(total)}
    optional = {
        "loss": loss,
        "lr": lr,
        "seconds_per_step": seconds_per_step,
        "eta_seconds": eta_seconds,
        "cost_usd": cost_usd,
        "estimated_cost_usd": estimated_cost_usd,
    }
    # JSON has no NaN or infinity: a diverged loss is written as unknown rather than as an unreadable line
    record.update({key: float(value) for key, value in optional.items() if value is not None and math.isfinite(value)})
    return json.dumps(record, separators=(",", ":"))


def parse_progress(line: str, source: str = "pod log") -> Progress | None:
    """The progress in one log line, or None when the line is not a progress record."""
    text = line.strip()
    if not text.startswith("{") or f'"{MARKER_KEY}"' not in text:
        return None  # most log lines: not worth a JSON parse
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or record.get(MARKER_KEY) != MARKER:
        return None
    step, total = record.get("step"), record.get("total")
    if record.get("state") not in STATES or not isinstance(step, int) or not isinstance(total, int):
        return None
    eta = _number(record.get("eta_seconds"))
    return Progress(
        source,
        record["state"],
        step,
        total,
        loss=_number(record.get("loss")),
        seconds_per_step=_number(record.get("seconds_per_step")),
        eta=None if eta is None else format_duration(eta),
        cost_usd=_number(record.get("cost_usd")),
    )


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
