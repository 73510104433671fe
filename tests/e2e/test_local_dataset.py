"""A dataset folder on this machine trains on the emulated pod: `up` uploads it through RunPod's S3 API (a real S3
server on 127.0.0.1, moto, standing in for it) before the pod starts, and the results come back as files and a
report, from the mounted volume (`wait: true`) and through the S3 API (`make fetch`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from contract.workspace import read_json
from emulator.demo import SAMPLING
from emulator.pods import ProcessRuntime
from emulator.volume_buckets import EMULATOR_KEYS, S3Server, VolumeBuckets
from infra.runpod_backend import runs, uploads
from infra.runpod_backend import s3 as runpod_s3
from infra.stack_files import parse_stack
from tests.e2e.conftest import STACK, start_emulator
from training import tiny


@pytest.fixture(scope="module")
def s3_endpoint():
    with S3Server() as url:
        yield url


@pytest.fixture
def with_s3(tmp_path, monkeypatch, seed, s3_endpoint):
    """The emulator whose volumes are also buckets on the S3 server; the S3 key pair in the environment."""
    monkeypatch.setenv(runpod_s3.ENDPOINT_ENV, s3_endpoint)
    monkeypatch.setenv(runpod_s3.ACCESS_KEY_ENV, EMULATOR_KEYS[0])
    monkeypatch.setenv(runpod_s3.SECRET_KEY_ENV, EMULATOR_KEYS[1])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    buckets = VolumeBuckets(s3_endpoint)
    runtime = ProcessRuntime(
        tmp_path / "emulator",
        seed_volume=lambda volume: shutil.copytree(seed / "models", volume / "models"),  # the model, not the data
        extra_env={"OMP_NUM_THREADS": "2"},
        stop_grace_s=10,
        volume_buckets=buckets,
    )
    emulated, server = start_emulator(tmp_path, monkeypatch, runtime)
    try:
        yield emulated, buckets
    finally:
        runtime.shutdown()
        server.__exit__(None, None, None)


def local_source(folder: Path) -> dict:
    """The train section's changes: the local folder, and make demo's sample prompts (for the report's grids)."""
    return {"dataset": {"source": str(folder)}, **SAMPLING}


def test_a_local_folder_is_uploaded_trained_on_and_comes_back_with_its_report(with_s3, tmp_path, monkeypatch):
    emulated, buckets = with_s3
    folder = tmp_path / "my-images"
    tiny.make_dataset(folder, 4)
    local = uploads.scan(folder)
    driver = emulated.driver(wait=True, train=local_source(folder))

    outputs, operations = driver.up()

    assert operations.counts == {"create": 3}  # volume, dataset upload, pod
    assert outputs["dataset"] == {"contentHash": local.content_hash, "files": 8, "bytes": local.total_bytes,
                                  "volumePath": f"/workspace/datasets/uploads/{local.content_hash}"}
    run = outputs["run"]
    assert run["state"] == "succeeded", run
    volume = emulated.runtime.volume_dir(outputs["volumeId"])
    uploaded = volume / "datasets" / "uploads" / local.content_hash
    assert sorted(path.name for path in uploaded.iterdir()) == sorted(name for name, _ in local.files)
    pod_spec = json.loads(emulated.client.get_pod(outputs["podId"])["env"]["LORASTACK_SPEC"])
    assert pod_spec["dataset"]["source"] == outputs["dataset"]["volumePath"]  # exactly that content
    fetched = Path(run["lora"])
    assert (fetched / "pytorch_lora_weights.safetensors").is_file() and (fetched / "README.md").is_file()
    assert (fetched / "history.jsonl").is_file() and sorted((fetched / "samples").iterdir())
    assert run["report"] == str(fetched / "report.html") and (fetched / "loss.png").is_file()
    assert "grid-step-000004.png" in (fetched / "report.html").read_text()

    # the same folder again: nothing is uploaded, nothing changes
    _, operations = driver.up()
    assert operations.changes == 0 and operations.counts["same"] == 3

    # make fetch through the S3 API (no volume mounted here): what the pod wrote reached its bucket
    monkeypatch.delenv("LORASTACK_WORKSPACE", raising=False)
    config = parse_stack(driver.config(), "stacks/Pulumi.demo.yaml")
    report = runs.fetch(STACK, config, tmp_path / "fetched", dict(os.environ))
    assert report.code == 0, report.lines
    assert (tmp_path / "fetched" / "pytorch_lora_weights.safetensors").read_bytes() == (
        fetched / "pytorch_lora_weights.safetensors").read_bytes()
    assert read_json(tmp_path / "fetched" / "status.json")["state"] == "succeeded"
    assert (tmp_path / "fetched" / "report.html").is_file()

    # a changed folder: a new upload that sends only what changed, and a new run
    tiny.make_dataset(folder, 5)  # the same four images and one more
    changed = uploads.scan(folder)
    quiet = emulated.driver(train=local_source(folder))
    outputs_after, operations = quiet.up()
    assert operations.counts["replace"] == 1 and operations.counts["update"] == 1  # the upload; the pod's spec
    assert outputs_after["runId"] != outputs["runId"]
    resources = {entry["name"]: entry for entry in json.loads(quiet.state_path.read_text())["resources"]}
    state = resources[f"{STACK}-dataset"]["outputs"]
    assert (state["contentHash"], state["filesSent"], state["bytesSent"]) == (
        changed.content_hash, 2, changed.total_bytes - local.total_bytes)
    assert runpod_s3.list_files(buckets.s3, outputs["volumeId"], uploads.UPLOADS_DIR + f"/{local.content_hash}/")

    assert quiet.destroy().counts == {"delete": 3}


def test_a_missing_folder_fails_the_up_before_anything_is_created(with_s3, tmp_path):
    emulated, _ = with_s3
    driver = emulated.driver(train=local_source(tmp_path / "not-there"))
    with pytest.raises(Exception, match=r"lorastack: train\.dataset\.source") as refused:
        driver.up()
    assert "does not exist on this machine" in str(refused.value)
    assert emulated.api.volumes == {} and emulated.api.pods == {}
