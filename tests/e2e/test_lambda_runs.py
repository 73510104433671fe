"""The RunPod fault matrix on Lambda Cloud: a run that ends terminates its own instance (Lambda bills until
terminate), on success, on a crash and at the money limit; a lost instance is replaced by `pulumi up --refresh`
and resumes from the filesystem; `pulumi destroy` mid-run leaves nothing billing and keeps the checkpoints; a
second `up` with no changes changes nothing; API faults during `up` launch exactly one instance (a launch whose
answer is lost: tests/test_lambda_providers.py, over the same HTTP, without the provider's 30 s timeout to sit out)."""

from __future__ import annotations

from safetensors.torch import load_file

from emulator.server import Fault
from training import checkpoints

from .conftest import probe_steps

ENDED_WITHIN_S = 300  # from `up` to a terminated instance: generous, the two cores are shared and loaded


def test_a_run_trains_terminates_its_instance_and_a_second_up_changes_nothing(lambda_cloud):
    driver = lambda_cloud.driver(keep_filesystem=False)
    outputs, operations = driver.up()
    assert operations.counts == {"create": 2}
    instance_id = outputs["instanceId"]
    assert lambda_cloud.runtime.wait_until_terminated(instance_id, ENDED_WITHIN_S), lambda_cloud.logs(instance_id)[-15:]
    status = lambda_cloud.status(outputs)
    record = lambda_cloud.api.record(instance_id)
    print(f"lambda run: {status['state']} at step {status['step']}, billed {record.billed_minutes} min")
    assert status["state"] == "succeeded" and status["step"] == 4
    assert lambda_cloud.filesystem_paths(outputs).done.exists()
    assert lambda_cloud.api.billing() == [] and 1 <= record.billed_minutes <= 3
    assert any("terminate requested" in line for line in lambda_cloud.logs(instance_id))

    _, again = driver.up()  # no changes: no second instance, no second run
    assert again.counts == {"same": 2} and lambda_cloud.api.instances == {}
    assert driver.destroy().counts == {"delete": 2}  # the instance is already gone: its delete is a no-op
    assert lambda_cloud.api.filesystems == {}


def test_a_trainer_that_crashes_terminates_its_instance_without_restarts(lambda_cloud):
    driver = lambda_cloud.driver(train={"baseModel": "/workspace/models/not-there"})
    outputs, _ = driver.up()
    instance_id = outputs["instanceId"]
    assert lambda_cloud.runtime.wait_until_terminated(instance_id, ENDED_WITHIN_S)
    status = lambda_cloud.status(outputs)
    assert status["state"] == "failed" and "not-there" in status["message"]
    exits = lambda_cloud.container_exits(instance_id)
    assert len(exits) == 1 and exits[0] != "container exited with code 0"  # --restart on-failure did not restart it
    assert lambda_cloud.api.billing() == []
    driver.destroy()


def test_the_money_limit_checkpoints_and_terminates(lambda_cloud):
    limit_seconds = 15
    max_cost = round(0.75 * limit_seconds / 3600, 6)  # gpu_1x_a10 at $0.75/h
    driver = lambda_cloud.driver(train={"steps": 2000, "checkpointEvery": 25},
                                 limits={"maxHours": 1, "maxCostUsd": max_cost, "allowBelowEstimate": True})
    outputs, _ = driver.up()
    instance_id = outputs["instanceId"]
    assert lambda_cloud.runtime.wait_until_terminated(instance_id, ENDED_WITHIN_S + limit_seconds)
    status = lambda_cloud.status(outputs)
    run = lambda_cloud.filesystem_paths(outputs)
    billed = lambda_cloud.api.record(instance_id).billed_minutes
    print(f"lambda money limit: stopped at step {status['step']}, billed {billed} min")
    assert status["state"] == "limit" and "money limit" in status["message"]
    assert (run.checkpoints / f"step-{status['step']}" / checkpoints.TRAINER_FILE).is_file()
    assert lambda_cloud.api.billing() == []
    driver.destroy()


def test_a_lost_instance_is_replaced_and_resumes_from_the_filesystem(lambda_cloud, faults):
    faults.probe_steps = True
    train = {"steps": 12, "checkpointEvery": 4, "keepCheckpoints": 2}
    driver = lambda_cloud.driver(train=train)
    outputs, _ = driver.up()
    lost = outputs["instanceId"]
    lambda_cloud.wait_for_log(lost, r"emulator-probe: step ([5-9]|1[01])$", timeout=ENDED_WITHIN_S)
    reached = max(probe_steps(lambda_cloud.runtime.lose_instance(lost)))

    assert driver.refresh().counts == {"gone": 1}  # `pulumi up --refresh`: the lost instance leaves the state
    outputs, operations = driver.up()
    assert operations.counts == {"same": 1, "create": 1}  # the same filesystem, a new instance
    assert outputs["instanceId"] != lost
    assert lambda_cloud.runtime.wait_until_terminated(outputs["instanceId"], ENDED_WITHIN_S)
    resumed_from = min(probe_steps(lambda_cloud.logs(outputs["instanceId"]))) - 1
    print(f"lambda lost instance: reached step {reached}, the new instance resumed from {resumed_from}")
    assert lambda_cloud.status(outputs)["state"] == "succeeded"
    assert resumed_from > 0 and 0 <= reached - resumed_from <= 4
    driver.destroy()


def test_destroy_while_training_keeps_the_filesystem_and_its_checkpoints(lambda_cloud):
    driver = lambda_cloud.driver(train={"steps": 2000, "checkpointEvery": 5})
    outputs, _ = driver.up()
    run = lambda_cloud.filesystem_paths(outputs)
    lambda_cloud.wait_for_checkpoint(run)

    assert driver.destroy().counts == {"delete": 1, "retain": 1}
    assert lambda_cloud.api.billing() == []
    assert lambda_cloud.runtime.wait_until_terminated(outputs["instanceId"], 30)  # the trainer process ended too
    assert [fs["name"] for fs in lambda_cloud.api.filesystems.values()] == [outputs["filesystem"]]
    status, newest = lambda_cloud.status(outputs), checkpoints.latest(run)
    assert status["state"] == "interrupted" and newest.name == f"step-{status['step']}"
    assert load_file(newest / "lora.safetensors")


def test_api_faults_during_up_launch_exactly_one_instance(lambda_api_only):
    api = lambda_api_only.api
    api.inject(Fault(status=503, count=2, method="GET", path_prefix="/api/v1/file-systems"))
    api.inject(Fault(status=429, count=1, method="POST", path_prefix="/api/v1/instance-operations/launch", retry_after="0"))
    api.inject(Fault(status=502, count=1, method="POST", path_prefix="/api/v1/instance-operations/launch"))
    driver = lambda_api_only.driver()
    outputs, operations = driver.up()
    assert operations.counts == {"create": 2}
    assert list(api.instances) == [outputs["instanceId"]]
    launches = [path for method, path, _ in api.request_bodies if path.endswith("/launch")]
    assert len(launches) == 3  # two refused, one launched; a lost answer: tests/test_lambda_providers.py
    assert driver.destroy().counts == {"delete": 1, "retain": 1} and api.billing() == []
