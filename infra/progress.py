"""A run's progress as the trainer reports it: from its status.json on the volume, or its lines in the log.

The trainer prints `step 120/1000 loss 0.1234 lr 1.0e-04 0.85 s/step ETA 12m45s cost $0.12 (est. $0.30)` as it goes
and `succeeded: <message> (step 1000/1000, 1h02m, cost $0.60)` last. Cloud-free: every backend's status and
follower read progress through here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# `step 120/1000 loss 0.1234 lr 1.0e-04 0.85 s/step ETA 12m45s cost $0.12 (est. $0.30)` (training/tracking.py)
_PROGRESS = re.compile(
    r"\bstep (?P<step>\d+)/(?P<total>\d+)"
    r"(?: loss (?P<loss>\S+))?"
    r"(?: lr \S+)?"
    r"(?: (?P<per_step>[\d.]+) s/step ETA (?P<eta>\S+))?"
    r"(?: cost \$(?P<cost>[\d.]+))?"
)
# `succeeded: <message> (step 1000/1000, 1h02m, cost $0.60)`: the trainer's last line
_FINISHED = re.compile(r"^(?P<state>succeeded|failed|limit|stalled|interrupted): .*\(step (?P<step>\d+)/(?P<total>\d+), "
                       r"\S+, cost \$(?P<cost>[\d.]+)\)$")


@dataclass
class Progress:
    source: str  # where the numbers came from: status.json or the pod log
    state: str | None = None  # the trainer's state: running, succeeded, failed, limit, stalled, interrupted
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    seconds_per_step: float | None = None
    eta: str | None = None
    cost_usd: float | None = None


def parse_progress_line(line: str) -> Progress | None:
    """The numbers in one trainer log line, or None when it is not a progress or final line."""
    finished = _FINISHED.match(line.strip())
    if finished:
        return Progress("pod log", finished["state"], int(finished["step"]), int(finished["total"]),
                        cost_usd=float(finished["cost"]))
    match = _PROGRESS.search(line)
    if not match:
        return None
    return Progress(
        "pod log", "running", int(match["step"]), int(match["total"]),
        loss=_float(match["loss"]), seconds_per_step=_float(match["per_step"]), eta=match["eta"],
        cost_usd=_float(match["cost"]),
    )


def _float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def progress_from_status_file(status: dict) -> Progress:
    eta = status.get("eta_seconds")
    return Progress(
        "status.json", status.get("state"), status.get("step"), status.get("total"), status.get("loss"),
        status.get("seconds_per_step"), None if eta is None else _format_seconds(eta), status.get("cost_usd"),
    )


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")
