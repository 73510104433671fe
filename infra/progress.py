"""A run's progress as the trainer reports it: from its status.json on the volume, or its records in the log.

The trainer prints a progress record (one JSON line, `contract/progress.py`) with each progress update and its final
line; the reader there is the only parser of them. Cloud-free: every backend's status and follower read progress
through here.
"""

from __future__ import annotations

from contract.progress import Progress, format_duration, parse_progress


def parse_progress_line(line: str) -> Progress | None:
    """The trainer's progress record in one pod log line, or None for any other line."""
    return parse_progress(line, source="pod log")


def progress_from_status_file(status: dict) -> Progress:
    eta = status.get("eta_seconds")
    return Progress(
        "status.json", status.get("state"), status.get("step"), status.get("total"), status.get("loss"),
        status.get("seconds_per_step"), None if eta is None else format_duration(eta), status.get("cost_usd"),
    )
