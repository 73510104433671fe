"""The run's history on the volume (contract/history.py): appended across restarts, torn lines skipped,
every sample step's images kept with their prompts; and the trainer's Reporter writing both."""

from __future__ import annotations

import io
import json

from PIL import Image

from contract import history
from contract.spec import RunLimits, TrainSpec
from contract.workspace import RunPaths
from training.tracking import Reporter


def test_a_restarted_run_appends_and_the_reader_keeps_the_attempt_that_made_the_weights(tmp_path):
    run = tmp_path / "runs" / "r1"
    # first pod: steps 1-3, a checkpoint at 2, killed while writing step 4's line
    history.record_start(run, 0, "abc123", 6)
    for step, loss in [(1, 0.9), (2, 0.8), (3, 0.7)]:
        history.record_step(run, step, loss, 1e-4)
    history.record_checkpoint(run, 2)
    with history.history_path(run).open("ab") as handle:
        handle.write(b'{"step": 4, "loss": 0.6')  # the pod died here: no newline, half a record
    # second pod: resumes from the checkpoint, redoes step 3 (differently: other data order) and finishes
    history.record_start(run, 2, "abc123", 6)
    for step, loss in [(3, 0.65), (4, 0.55)]:
        history.record_step(run, step, loss, 5e-5)
    history.record_checkpoint(run, 4)

    lines = history.history_path(run).read_text().splitlines()
    assert lines[5] == '{"step": 4, "loss": 0.6'  # the torn line stays on its own; the resume record is whole
    assert json.loads(lines[6])["resume"] == 2

    read = history.read_history(history.history_path(run))
    assert [(r.step, r.loss, r.lr) for r in read.steps] == [
        (1, 0.9, 1e-4), (2, 0.8, 1e-4), (3, 0.65, 5e-5), (4, 0.55, 5e-5)
    ]
    assert read.checkpoints == [2, 4] and read.resumes == [2]
    assert read.skipped_lines == 1
    assert (read.data_hash, read.dataset_files) == ("abc123", 6)
    assert len(read.process_spans) == 2 and read.training_seconds >= 0


def test_a_restart_from_scratch_drops_the_lost_attempts_steps(tmp_path):
    run = tmp_path / "run"
    history.record_start(run, 0, "h", 1)
    for step in (1, 2, 3):
        history.record_step(run, step, 1.0, 1e-4)
    history.record_start(run, 0, "h", 1)  # killed before any checkpoint: the new pod starts over
    history.record_step(run, 1, 0.5, 1e-4)
    read = history.read_history(history.history_path(run))
    assert [(r.step, r.loss) for r in read.steps] == [(1, 0.5)]
    assert read.resumes == [0]


def test_an_absent_or_foreign_history_reads_as_empty(tmp_path):
    assert history.read_history(tmp_path / "missing.jsonl").steps == []
    path = tmp_path / "history.jsonl"
    path.write_text('[1, 2]\nnot json\n{"step": 1, "loss": NaN}\n{"step": 2, "loss": "x"}\n')
    read = history.read_history(path)
    assert read.steps == [] and read.skipped_lines == 2


def test_samples_keep_every_step_with_their_prompts(tmp_path):
    run = tmp_path / "run"
    prompts = ["a photo of sks dog", "sks dog on the beach, oil painting / 4k"]
    for step in (100, 200):
        history.save_samples(run, step, prompts, [b"png-a", b"png-b"])
    history.save_samples(run, 200, prompts, [b"png-a2", b"png-b2"])  # the same step again: replaced, not doubled

    samples = run / history.SAMPLES_DIR
    assert sorted(p.relative_to(samples).as_posix() for p in samples.rglob("*.png")) == [
        "step-000100/00-a-photo-of-sks-dog.png",
        "step-000100/01-sks-dog-on-the-beach-oil-painting-4k.png",
        "step-000200/00-a-photo-of-sks-dog.png",
        "step-000200/01-sks-dog-on-the-beach-oil-painting-4k.png",
    ]
    read = history.read_samples(samples)
    assert [entry.step for entry in read] == [100, 200]
    assert [image.prompt for image in read[1].images] == prompts
    assert read[1].images[0].path.read_bytes() == b"png-a2"

    (samples / history.SAMPLES_INDEX).unlink()  # a partial download without the index: prompts from the names
    assert [image.prompt for image in history.read_samples(samples)[0].images] == [
        "a photo of sks dog",
        "sks dog on the beach oil painting 4k",
    ]


def test_the_reporter_records_every_step_and_saves_samples_in_the_layout(tmp_path):
    paths = RunPaths(tmp_path, "run-1")
    spec = TrainSpec(family="sd15", base_model="tiny/sd15", dataset={"source": "/data"}, resolution=512, steps=10)
    limits = RunLimits(max_hours=1, max_cost_usd=1)
    reporter = Reporter(paths, spec, limits, "run-1", total_steps=10, out=io.StringIO(), environ={})
    for step in range(1, 4):
        reporter.step(step, 1.0 / step, 1e-4)
    saved = reporter.samples(3, [Image.new("RGB", (8, 8), "red")] * 2, ["a photo of sks", "sks dog"])

    read = history.read_history(paths.run / history.HISTORY_FILE)
    assert [(r.step, r.loss) for r in read.steps] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    (entry,) = history.read_samples(paths.run / "samples")
    assert [image.path for image in entry.images] == saved
    assert [image.prompt for image in entry.images] == ["a photo of sks", "sks dog"]
