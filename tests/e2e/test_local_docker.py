"""The local backend's fault matrix, end to end: the Docker Engine API emulator's containers run the real trainer
(`python -m training` on the tiny SD 1.5, on the CPU) with the stack's folder as /workspace, driven by the real
program and providers through the offline engine and the real `docker` SDK.

Success and `up` twice; a crash (the container exits, nothing restarts it); the time limit and the money limit
(the stack's own usdPerHour); a lost machine (the container killed outright: refresh drops it and the next `up`
resumes from the folder's checkpoint); `destroy` while training (the trainer checkpoints on SIGTERM, the folder
is kept). Waits are on conditions with generous deadlines: the machine is shared.
"""

from __future__ import annotations

import shutil
import signal
import time

import pytest
from safetensors.torch import load_file

from contract.workspace import RunPaths, read_json
from emulator.docker_engine import DockerEngineApi
from emulator.pods import PodFaults
from training import checkpoints

from ..local_engine import start
from .conftest import demo_config, probe_steps

DEADLINE_S = 180  # a trainer's imports alone take tens of seconds on two busy cores


@pytest.fixture
def faults() -> PodFaults:
    return PodFaults(probe_steps=True)  # `emulator-probe: step N` after each step: how far a killed trainer got


@pytest.fixture
def local(tmp_path, monkeypatch, seed, faults):
    api = DockerEngineApi(extra_env={"OMP_NUM_THREADS": "2"}, faults=faults)
    engine, server = start(tmp_path, monkeypatch, api)
    shutil.copytree(seed, engine.folder)  # the user's model and images in the stack's folder
    try:
        yield engine
    finally:
        api.shutdown()
        server.__exit__(None, None, None)


def tiny(**changes) -> dict:
    """The demo's tiny training (a model and images in the folder), with `changes`."""
    return {**demo_config()["lorastack:train"], **changes}


def wait_until_exited(local, container_id: str, timeout: float = DEADLINE_S) -> dict:
    container = local.api.containers[container_id]
    assert container.ended.wait(timeout), f"still running after {timeout} s; log tail: {local.api.lines(container_id)[-15:]}"
    return container.state()


def wait_for_checkpoint(paths: RunPaths, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while checkpoints.latest(paths) is None:
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)


def run_paths(local, outputs: dict) -> RunPaths:
    return RunPaths(local.folder, outputs["runId"])


def test_a_run_trains_exports_and_a_second_up_changes_nothing(local):
    driver = local.driver(train=tiny())
    outputs, operations = driver.up()
    assert operations.counts == {"create": 2}
    state = wait_until_exited(local, outputs["containerId"])
    paths = run_paths(local, outputs)
    assert state["ExitCode"] == 0 and paths.done.exists()
    assert (read_json(paths.status) or {})["state"] == "succeeded"
    assert any(paths.lora.glob("*.safetensors")) and outputs["loraDir"] == str(paths.lora)

    local.api.sent.clear()
    second, operations = driver.up()
    assert operations.counts == {"same": 2} and operations.changes == 0
    writes = [r for r in local.api.sent if r.method in ("POST", "DELETE")]
    assert writes == [] and second["containerId"] == outputs["containerId"] and len(local.api.containers) == 1

    assert driver.destroy().counts == {"delete": 1, "retain": 1}
    assert local.api.containers == {} and paths.done.exists()  # the folder and its LoRA are kept


def test_a_crash_ends_the_container_without_restarts(local):
    driver = local.driver(train=tiny(baseModel="/workspace/models/not-there"))
    outputs, _ = driver.up()
    state = wait_until_exited(local, outputs["containerId"])
    assert state["ExitCode"] not in (0, 75) and state["Status"] == "exited"
    status = read_json(run_paths(local, outputs).status) or {}
    assert status["state"] == "failed" and "not-there" in status["message"]
    assert any("not-there" in line for line in local.api.lines(outputs["containerId"]))
    assert driver.refresh().counts == {}  # a crash is not a lost machine: the container stays in the state
    _, operations = driver.up()
    assert operations.counts == {"same": 2}  # and `up` does not run it again
    assert local.api.running() == [] and len(local.api.containers) == 1  # restart policy no: nothing restarted it
    driver.destroy()


@pytest.mark.parametrize(("limits", "usd_per_hour", "said"), [
    ({"maxHours": 0.005, "maxCostUsd": 1, "allowBelowEstimate": True}, 0.0, "time limit"),  # 18 s; at 0 $/h only maxHours counts
    ({"maxHours": 1, "maxCostUsd": 0.02, "allowBelowEstimate": True}, 4.0, "money limit"),  # 18 s at the stack's own 4 $/h
])
def test_a_limit_checkpoints_and_ends_the_container(local, limits, usd_per_hour, said):
    driver = local.driver(train=tiny(steps=5000, checkpointEvery=25), limits=limits, local={"usdPerHour": usd_per_hour})
    outputs, _ = driver.up()
    state = wait_until_exited(local, outputs["containerId"], timeout=DEADLINE_S + 60)
    paths = run_paths(local, outputs)
    status = read_json(paths.status) or {}
    print(f"{said}: container exit {state['ExitCode']}, ledger {status.get('life', {}).get('seconds')} s, "
          f"step {status.get('step')}")
    assert status["state"] == "limit" and said in status["message"]
    assert (paths.checkpoints / f"step-{status['step']}" / checkpoints.TRAINER_FILE).is_file()
    assert not paths.done.exists() and local.api.running() == []
    driver.destroy()


def test_a_lost_machine_resumes_from_the_folder_in_a_new_container(local):
    train = tiny(steps=16, checkpointEvery=4, keepCheckpoints=2)
    driver = local.driver(train=train)
    outputs, _ = driver.up()
    lost = outputs["containerId"]
    deadline = time.monotonic() + DEADLINE_S
    while max(probe_steps(local.api.lines(lost)), default=0) < 6:
        assert time.monotonic() < deadline, f"the trainer never reached step 6: {local.api.lines(lost)[-15:]}"
        time.sleep(0.1)
    local.api.signal(local.api.containers[lost], signal.SIGKILL)  # the machine went down: no signal to act on
    state = wait_until_exited(local, lost)
    assert state["ExitCode"] == 137
    reached = max(probe_steps(local.api.lines(lost)))

    assert driver.refresh().counts == {"gone": 1}  # the killed container leaves the state
    resumed, operations = driver.up()
    assert operations.counts == {"same": 1, "create": 1}
    new = resumed["containerId"]
    assert new != lost and list(local.api.containers) == [new]  # the killed one was removed to free its name
    assert wait_until_exited(local, new)["ExitCode"] == 0
    resumed_from = min(probe_steps(local.api.lines(new))) - 1
    print(f"lost machine: the killed trainer reached step {reached}, the new container resumed from {resumed_from}")
    assert resumed_from > 0 and 0 <= reached - resumed_from <= 4
    assert (read_json(run_paths(local, resumed).status) or {})["state"] == "succeeded"
    driver.destroy()


def test_destroy_while_training_keeps_the_folder_and_its_checkpoints(local):
    driver = local.driver(train=tiny(steps=2000, checkpointEvery=5))
    outputs, _ = driver.up()
    paths = run_paths(local, outputs)
    wait_for_checkpoint(paths)

    assert driver.destroy().counts == {"delete": 1, "retain": 1}
    assert local.api.containers == {} and local.api.running() == []
    status = read_json(paths.status) or {}
    newest = checkpoints.latest(paths)
    print(f"destroy while training: trainer {status['state']} at step {status['step']}, newest {newest.name}")
    assert status["state"] == "interrupted" and newest.name == f"step-{status['step']}"
    assert load_file(newest / "lora.safetensors")
