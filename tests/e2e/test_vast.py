"""Vast.ai end to end: the example stack's instance runs the real trainer (emulator/vast.py), mirrors its run to an
S3 bucket (moto), and destroys itself on success, failure and limits; a lost host resumes from the bucket on a new
instance; destroy while training leaves nothing billing; `up` twice changes nothing; `make fetch` reads the bucket."""

from __future__ import annotations

import json
import os

from infra.stack_files import parse_stack
from infra.vast_backend import runs

from .vast_setup import STACK  # its fixture comes through conftest.py

GONE_WITHIN_S = 180  # a whole tiny run on two shared cores, imports included


def bucket_status(vast, run_id: str) -> dict:
    """status.json as the trainer mirrored it."""
    body = vast.s3.client().get_object(Bucket="lorastack-e2e", Key=f"e2e/runs/{run_id}/status.json")["Body"]
    return json.loads(body.read())


def stack_config(vast):
    """The stack as the driver runs it (the example file plus the test's overrides), for the ops commands."""
    return parse_stack(vast.driver().config(), STACK)


def test_a_run_trains_mirrors_destroys_itself_and_a_second_up_changes_nothing(vast, tmp_path):
    driver = vast.driver()
    outputs, operations = driver.up()
    assert operations.counts == {"create": 1}
    instance_id, run_id = outputs["instanceId"], outputs["runId"]
    assert outputs["offerUsdPerHour"] == 0.47  # the cheapest of the three offers

    assert vast.runtime.wait_until_gone(int(instance_id), GONE_WITHIN_S), vast.logs(instance_id)[-20:]
    keys = vast.s3.keys("lorastack-e2e", f"e2e/runs/{run_id}/")
    assert f"e2e/runs/{run_id}/DONE" in keys and any("/lora/" in key for key in keys)
    status = bucket_status(vast, run_id)
    assert status["state"] == "succeeded" and status["step"] == 4
    assert not vast.runtime.disk(int(instance_id)).exists()  # the disk went with the instance

    vast.api.bodies.clear()
    _, again = driver.up()  # the instance destroyed itself; the state still holds it, the inputs did not change
    assert again.counts == {"same": 1} and again.changes == 0
    assert [r for r in vast.api.bodies if r.method in ("PUT", "POST", "DELETE") and "bundles" not in r.path] == []

    destination = tmp_path / "fetched"
    report = runs.fetch(STACK, stack_config(vast), destination, dict(os.environ))
    assert any(destination.rglob("*.safetensors")) and "LoRA downloaded" in report.lines[-1]
    assert driver.destroy().counts == {"delete": 1} and vast.api.instances == {}


def test_a_crash_destroys_the_instance_and_the_reason_is_in_the_bucket(vast):
    driver = vast.driver(train={"baseModel": "/workspace/models/not-there"})
    outputs, _ = driver.up()
    assert vast.runtime.wait_until_gone(int(outputs["instanceId"]), GONE_WITHIN_S)
    status = bucket_status(vast, outputs["runId"])
    assert status["state"] == "failed" and "not-there" in status["message"]
    driver.destroy()


def test_the_time_limit_checkpoints_mirrors_and_destroys(vast):
    limits = {"maxHours": 0.005, "allowBelowEstimate": True}  # 18 s: below the estimate on purpose
    driver = vast.driver(train={"steps": 2000, "checkpointEvery": 5}, limits=limits)
    outputs, _ = driver.up()
    assert vast.runtime.wait_until_gone(int(outputs["instanceId"]), GONE_WITHIN_S)
    status = bucket_status(vast, outputs["runId"])
    assert status["state"] == "limit" and "time limit" in status["message"]
    assert status["step"] in vast.mirror.remote_checkpoints(outputs["runId"])  # saved where it stopped, in the bucket
    driver.destroy()


def test_the_money_limit_counts_at_the_ceiling_and_destroys(vast):
    # the trainer cannot read its billed rate with the instance key: it counts at maxUsdPerHour ($0.5/h): about
    # 43 s, room for a loaded machine
    limits = {"maxHours": 1, "maxCostUsd": 0.006, "allowBelowEstimate": True}
    driver = vast.driver(train={"steps": 2000, "checkpointEvery": 5}, limits=limits)
    outputs, _ = driver.up()
    assert vast.runtime.wait_until_gone(int(outputs["instanceId"]), GONE_WITHIN_S)
    status = bucket_status(vast, outputs["runId"])
    assert status["state"] == "limit" and "money limit" in status["message"], status.get("message")
    assert status["step"] in vast.mirror.remote_checkpoints(outputs["runId"])
    driver.destroy()


def test_a_lost_host_resumes_on_a_new_instance_from_the_bucket(vast):
    train = {"steps": 16, "checkpointEvery": 4, "keepCheckpoints": 2}
    driver = vast.driver(train=train)
    outputs, _ = driver.up()
    lost, run_id = outputs["instanceId"], outputs["runId"]
    vast.wait_for(lambda: [s for s in vast.mirror.remote_checkpoints(run_id) if s >= 4], "a checkpoint in the bucket")
    vast.runtime.lose_host(int(lost))
    reached = max(vast.mirror.remote_checkpoints(run_id))

    assert driver.refresh().counts == {}  # still there (offline): read, not gone
    outputs, operations = vast.driver(train=train).up()
    assert operations.counts == {"replace": 1} or operations.counts == {"delete": 1, "create": 1}, operations.counts
    new = outputs["instanceId"]
    assert new != lost and int(lost) not in vast.api.instances  # the lost one no longer bills its disk
    assert vast.runtime.wait_until_gone(int(new), GONE_WITHIN_S), vast.logs(new)[-20:]
    status = bucket_status(vast, run_id)
    assert status["state"] == "succeeded" and status["step"] == 16, "\n".join([status.get("message", ""), *vast.logs(new)[-40:]])
    restored = next(line for line in vast.logs(new) if "restored checkpoint" in line)
    resumed_from = int(restored.split("step-")[1].split()[0])
    print(f"lost host: the bucket held step {reached} when the host was lost; the new instance resumed from "
          f"step {resumed_from}")
    assert resumed_from == reached >= 4
    driver.destroy()


def test_destroy_while_training_leaves_nothing_billing_and_keeps_the_bucket(vast):
    driver = vast.driver(train={"steps": 2000, "checkpointEvery": 5})
    outputs, _ = driver.up()
    instance_id, run_id = outputs["instanceId"], outputs["runId"]
    vast.wait_for(lambda: vast.mirror.remote_checkpoints(run_id), "a checkpoint in the bucket")
    assert driver.destroy().counts == {"delete": 1}
    assert vast.api.instances == {}
    assert vast.runtime.wait_until_gone(int(instance_id), 30)  # the trainer was stopped with it
    assert vast.mirror.remote_checkpoints(run_id)  # the user's bucket keeps the checkpoints
