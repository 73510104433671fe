"""The money faults, end to end against the emulators: each used to leave something billing (two trainings, a
pod outside the state, a pod restarting forever, a pod whose entrypoint never ran, a run stopped by its own limits
before it could finish). The full volume, the fifth, is tests/e2e/test_volume_full.py.
"""

from __future__ import annotations

import re

import pytest

from emulator.language_host import ProgramError
from emulator.replicate import ReplicateApi
from emulator.server import Fault, serve
from emulator.stack_driver import StackDriver
from infra.runpod_backend.provider import RunpodProvider
from infra.stack_files import StackError, parse_stack

REPLICATE_TOKEN = "r8_e2e_money_faults_0123456789"


@pytest.fixture
def short_timeout(monkeypatch):
    retries, backoff, _ = RunpodProvider.__init__.__defaults__
    monkeypatch.setattr(RunpodProvider.__init__, "__defaults__", (retries, backoff, 2.0))


def test_a_replicate_training_whose_create_answer_is_lost_runs_and_bills_once(tmp_path, monkeypatch):
    api = ReplicateApi(tokens=(REPLICATE_TOKEN,), account="alice", start_seconds=60, run_seconds=600)
    # the server starts the training, then the connection drops before its answer
    api.inject(Fault(0, method="POST", path_prefix="/v1/models/ostris", after_work=True))
    with serve(api) as base_url:
        monkeypatch.setenv("REPLICATE_BASE_URL", base_url)
        monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_TOKEN)  # the providers' fallback to the config
        replicate = {"owner": "alice", "model": "lora", "hardware": "gpu-h100", "trainingHardware": "gpu-h100",
                     "wait": False}
        driver = StackDriver("flux-replicate", tmp_path / "state", secrets={"replicateApiToken": REPLICATE_TOKEN},
                             overrides={"lorastack:replicate": replicate, "lorastack:wait": False})
        outputs, operations = driver.up()
        assert operations.counts == {"create": 2}  # the model and the training
        assert list(api.trainings) == [outputs["trainingId"]]
        _, again = driver.up()  # the next `up` has nothing to start
        assert again.changes == 0 and len(api.trainings) == 1
        posted = [r for r in api.requests if r[0] == "POST" and r[1].endswith("/trainings")]
        assert len(posted) == 1


def test_a_pod_create_whose_answer_is_lost_while_look_ups_fail_is_adopted_and_destroyed(api_only, short_timeout, monkeypatch):
    api = api_only.api
    api.inject(Fault(0, method="POST", path_prefix="/v2/pods", after_work=True))  # created, then a reset
    dispatch = api.dispatch

    def struggling_after_the_create(request):
        response = dispatch(request)
        if (request.method, request.path) == ("POST", "/v2/pods"):
            # more failed look-ups in a row than any one call's retries absorb
            api.inject(Fault(500, count=10, method="GET", path_prefix="/v2/pods"))
        return response

    monkeypatch.setattr(api, "dispatch", struggling_after_the_create)
    driver = api_only.driver()
    outputs, operations = driver.up()
    assert operations.counts == {"create": 2}
    assert list(api.pods) == [outputs["podId"]]  # the pod the lost answer made, in the state
    assert driver.destroy().counts == {"delete": 2}
    assert api.pods == {} and api.volumes == {}  # the volume was not held by a pod outside the state


def test_a_locked_pod_is_not_taken_for_stopped_and_never_restarts(emulated):
    driver = emulated.driver()
    outputs, _ = driver.up()
    pod_id = outputs["podId"]
    emulated.client.update_pod(pod_id, {"locked": True})  # RunPod answers a stop with 409
    emulated.wait_for_log(pod_id, r"refused to stop while RUNNING", timeout=90)
    assert emulated.api.pods[pod_id].status == "RUNNING"
    emulated.client.update_pod(pod_id, {"locked": False})
    assert emulated.runtime.wait_until_stopped(pod_id, timeout=90)
    paths = emulated.volume_paths(outputs["volumeId"], outputs["runId"])
    assert paths.done.exists() and emulated.status(outputs["volumeId"], outputs["runId"])["state"] == "succeeded"
    assert len(emulated.runtime.bill(pod_id).containers) == 1  # the trainer kept asking: no restart, no rerun
    driver.destroy()


@pytest.mark.parametrize("changes, named", [
    ({"train": {"samplePrompts": ["\u00e9" * 1000] * 16, "sampleEvery": 2}}, "bytes as the pod's $LORASTACK_SPEC"),
    ({"train": {"triggerWord": "w" * 200}}, "train.triggerWord"),
    ({"limits": {"maxCostUsd": 0.01}}, "limits.maxCostUsd (0.01) is below this run's estimated cost ($0.04)"),
    ({"limits": {"maxHours": 0.05}}, "limits.maxHours (0.05) is below this run's estimated time (0.17 h)"),
], ids=["spec-too-large-for-the-env", "free-text-over-its-bound", "money-limit-below-estimate", "time-below-estimate"])
def test_inputs_that_would_bill_for_nothing_are_refused_before_any_request(api_only, changes, named):
    driver = api_only.driver(**changes)
    with pytest.raises(StackError) as refused:
        parse_stack(driver.config(), "stacks/Pulumi.demo.yaml")  # what `make check` runs over the stack file
    assert any(named in line for line in refused.value.problems), refused.value.problems
    with pytest.raises(ProgramError, match=re.escape(named)):
        driver.up()  # and `pulumi up` (the program fails under the engine), before anything is created
    assert api_only.api.requests == [] and api_only.api.pods == {}
