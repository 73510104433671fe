"""The run mirror (cloudapi/run_mirror.py) against an S3 API on 127.0.0.1: what a new machine restores is the
newest complete checkpoint and the run's files; an incomplete upload is never taken for a checkpoint."""

from __future__ import annotations

import pytest

from cloudapi.hosts import mirror_from_environment
from cloudapi.run_mirror import RunMirror, parse_url
from contract.workspace import RunPaths

from .s3_server import ACCESS_KEY, REGION, SECRET_KEY, s3_server

BUCKET = "runs"


@pytest.fixture(scope="module")
def s3():
    with s3_server(BUCKET) as server:
        yield server


def mirror(s3, prefix: str) -> RunMirror:
    return RunMirror.from_settings(f"s3://{BUCKET}/{prefix}", s3.endpoint, aws_access_key_id=ACCESS_KEY,
                                   aws_secret_access_key=SECRET_KEY, region_name=REGION)


def write_checkpoint(paths: RunPaths, step: int) -> None:
    directory = paths.checkpoints / f"step-{step}"
    directory.mkdir(parents=True)
    (directory / "lora.safetensors").write_bytes(b"weights %d" % step)
    (directory / "trainer.json").write_text(f'{{"step": {step}}}')


def test_a_new_machine_restores_the_newest_checkpoint_and_the_run_files(s3, tmp_path):
    old = RunPaths(tmp_path / "old", "run-a")
    run = mirror(s3, "p1")
    old.run.mkdir(parents=True)
    old.status.write_text('{"state": "running", "step": 4}')
    for step in (2, 4):
        write_checkpoint(old, step)
        run.push_checkpoint(old, old.checkpoints / f"step-{step}")

    new = RunPaths(tmp_path / "new", "run-a")
    lines: list[str] = []
    run.restore(new, lines.append)
    assert (new.checkpoints / "step-4" / "lora.safetensors").read_bytes() == b"weights 4"
    assert not (new.checkpoints / "step-2").exists()  # only the newest comes back
    assert new.status.read_text() == '{"state": "running", "step": 4}'
    assert lines == [f"restored checkpoint step-4 and 1 run files from s3://{BUCKET}/p1/runs/run-a"]


def test_checkpoints_the_volume_pruned_leave_the_bucket_and_a_partial_upload_is_not_one(s3, tmp_path):
    paths = RunPaths(tmp_path / "disk", "run-b")
    run = mirror(s3, "p2")
    for step in (2, 4, 6):
        write_checkpoint(paths, step)
        if step == 6:  # keepCheckpoints 2: the trainer pruned step-2 before this push
            for file in (paths.checkpoints / "step-2").iterdir():
                file.unlink()
            (paths.checkpoints / "step-2").rmdir()
        run.push_checkpoint(paths, paths.checkpoints / f"step-{step}")
    assert run.remote_checkpoints("run-b") == [4, 6]
    # a machine lost mid-upload: step-8's weights arrived, its trainer.json (uploaded last) did not
    s3.client().put_object(Bucket=BUCKET, Key="p2/runs/run-b/checkpoints/step-8/lora.safetensors", Body=b"half")
    assert run.remote_checkpoints("run-b") == [4, 6]

    fresh = RunPaths(tmp_path / "fresh", "run-b")
    run.restore(fresh, lambda line: None)
    assert sorted(p.name for p in fresh.checkpoints.iterdir()) == ["step-6"]


def test_results_go_up_with_done_last_and_a_finished_run_comes_back_done(s3, tmp_path):
    paths = RunPaths(tmp_path / "disk", "run-c")
    (paths.lora).mkdir(parents=True)
    (paths.lora / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    paths.done.write_text("{}")
    run = mirror(s3, "p3")
    uploaded: list[str] = []
    original = run.client.upload_file
    run.client.upload_file = lambda path, bucket, key: (uploaded.append(key), original(path, bucket, key))
    assert run.push_files(paths) == 2
    assert uploaded[-1] == "p3/runs/run-c/DONE"

    again = RunPaths(tmp_path / "again", "run-c")
    run.restore(again, lambda line: None)
    assert again.done.exists() and (again.lora / "pytorch_lora_weights.safetensors").read_bytes() == b"lora"


def test_the_machine_environment_names_the_mirror(s3):
    assert mirror_from_environment({}) is None
    found = mirror_from_environment({"LORASTACK_MIRROR_URL": f"s3://{BUCKET}/x/y/", "LORASTACK_MIRROR_ENDPOINT": s3.endpoint,
                                     **s3.environ()})
    assert (found.bucket, found.prefix) == (BUCKET, "x/y")
    assert found.remote_checkpoints("none") == []
    with pytest.raises(ValueError, match=r"s3://<bucket>"):
        parse_url("https://bucket/prefix")
