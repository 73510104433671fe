"""Progress records (contract/progress.py): what the trainer writes is what `make status` reads back."""

from __future__ import annotations

import json

import pytest

from contract.progress import MARKER, MARKER_KEY, Progress, parse_progress, progress_record


def test_a_record_reads_back_with_every_number():
    line = progress_record(
        "running", 120, 1000, loss=0.1234, lr=1e-4, seconds_per_step=0.85, eta_seconds=765.4, cost_usd=0.12,
        estimated_cost_usd=0.3,
    )
    assert "\n" not in line and json.loads(line)[MARKER_KEY] == MARKER
    assert parse_progress(line) == Progress("pod log", "running", 120, 1000, 0.1234, 0.85, "12m45s", 0.12)
    assert parse_progress(f"  {line}\r\n", source="replay").source == "replay"  # log transport whitespace


def test_unknown_numbers_are_left_out_and_read_back_as_unknown():
    line = progress_record("succeeded", 1500, 1500, cost_usd=0.28, loss=float("nan"))
    assert set(json.loads(line)) == {MARKER_KEY, "state", "step", "total", "cost_usd"}
    assert parse_progress(line) == Progress("pod log", "succeeded", 1500, 1500, cost_usd=0.28)


@pytest.mark.parametrize(
    "line",
    [
        "step 120/1000 loss 0.1234 lr 1.0e-04 0.85 s/step ETA 12m45s cost $0.12 (est. $0.30)",  # the human line
        "succeeded: trained 4 steps (step 4/4, 2s, cost $0.00)",
        '{"level": "info", "step": 3, "total": 9}',  # someone else's JSON
        '{"lorastack": "progress", "state": "running", "step": 3}',  # no total
        '{"lorastack": "progress", "state": "exploded", "step": 3, "total": 9}',  # not a trainer state
        '{"lorastack": "progress", "state": "running", "step": 3, "total": 9',  # cut off
        "",
    ],
)
def test_other_lines_are_not_progress(line):
    assert parse_progress(line) is None


def test_the_writer_refuses_a_state_the_reader_would_drop():
    with pytest.raises(ValueError, match="progress state must be one of"):
        progress_record("done", 1, 1)
