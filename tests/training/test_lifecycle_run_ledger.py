"""Lifecycle across processes: limits count the run's whole life (status.json's ledger), the watchdog's setup
allowance before the first step, the crash-loop guard, and a refused configuration stopping its pod."""

from __future__ import annotations

import errno
import signal
import threading

import pytest
import requests

from contract.spec import RunLimits
from contract.workspace import RunPaths, read_json
from emulator.server import serve
from training.lifecycle import (
    EXIT_CRASH_LOOP,
    EXIT_STALLED,
    MAX_STARTS_WITHOUT_PROGRESS,
    Lifecycle,
    describe_failure,
    fail_before_start,
)

from .test_tracking_lifecycle import POD_KEY, FakeClock, PodActions


@pytest.fixture
def runpod():
    api = PodActions()
    with serve(api) as url:
        yield api, {"RUNPOD_POD_ID": "pod123", "RUNPOD_API_KEY": POD_KEY, "RUNPOD_API_BASE_URL": url}


@pytest.fixture(autouse=True)
def keep_sigterm():
    """Lifecycle.start() installs a SIGTERM handler; runs left without finish() must not leave theirs."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def paths(tmp_path):
    return RunPaths(tmp_path, "run-1")


def test_a_restarted_process_keeps_counting_the_time_limit(paths):
    limits = RunLimits(max_hours=1, max_cost_usd=100, usd_per_hour=0.5)
    clock = FakeClock()
    first = Lifecycle(limits, paths, {}, clock)
    clock.now += 40 * 60
    first.beat(100)  # the first beat writes the ledger; the process then dies without finish()
    assert read_json(paths.status)["life"]["seconds"] == pytest.approx(40 * 60)

    clock = FakeClock()  # a new container: its own clock starts again
    second = Lifecycle(limits, paths, {}, clock, process_age_s=30)
    clock.now += 19 * 60
    second.beat(101)
    assert not second.stop_requested.is_set()  # 40 + 0.5 + 19 min
    clock.now += 60
    second.beat(102)
    assert second.stop_requested.is_set() and second.reason.startswith("time limit")


def test_the_watchdog_allows_a_long_setup_then_arms_at_the_first_step(runpod, paths):
    api, environ = runpod
    fired = threading.Event()
    codes = []

    def exit_process(code):
        codes.append(code)
        fired.set()

    # 0.3 s without a step, 1.8 s of setup
    limits = RunLimits(max_hours=1, max_cost_usd=10, stall_minutes=0.005, setup_minutes=0.03)
    life = Lifecycle(limits, paths, environ, exit_process=exit_process)
    life.start()
    try:
        assert not fired.wait(1.0), "the watchdog fired during setup, within the setup allowance"
        life.beat(1)
        assert fired.wait(5), "the watchdog did not fire after the first step"
    finally:
        life._finished.set()
    assert codes == [EXIT_STALLED] and api.actions == [("pod123", "stop")]
    assert "after step 1" in read_json(paths.status)["message"]


def test_a_container_that_keeps_dying_before_a_step_is_given_up(runpod, paths):
    api, environ = runpod
    limits = RunLimits(max_hours=1, max_cost_usd=10)
    for _ in range(MAX_STARTS_WITHOUT_PROGRESS):  # each start dies before its first step (no finish)
        Lifecycle(limits, paths, environ).start()._finished.set()
    with pytest.raises(SystemExit) as leaving:
        Lifecycle(limits, paths, environ).start()
    assert leaving.value.code == EXIT_CRASH_LOOP
    status = read_json(paths.status)
    assert status["state"] == "failed" and "without reaching a training step" in status["message"]
    assert api.actions == [("pod123", "stop")]
    # a new pod (after a fix) gets fresh tries
    Lifecycle(limits, paths, {**environ, "RUNPOD_POD_ID": "pod456"}).start()._finished.set()


def test_a_refused_configuration_is_recorded_and_stops_the_pod(runpod, paths):
    api, environ = runpod
    assert fail_before_start(["$LORASTACK_SPEC: steps = 0: must be >= 1"], paths, environ)
    status = read_json(paths.status)
    assert status["state"] == "failed" and "steps = 0" in status["message"]
    assert api.actions == [("pod123", "stop")]


def test_a_full_volume_is_described_with_the_checkpoint_that_survived(paths):
    complete = paths.checkpoints / "step-4"
    complete.mkdir(parents=True)
    (complete / "trainer.json").write_text("{}")
    error = OSError(errno.ENOSPC, "No space left on device", str(paths.checkpoints / ".tmp-step-6" / "optimizer.pt"))
    message = describe_failure(error, paths)
    assert "volume is full" in message and "step-4, is intact" in message and "sizeGb" in message


def test_the_money_limit_uses_the_rate_runpod_bills_the_pod_at():
    # The stack's table said $0.10/h; RunPod bills this 2-GPU pod at the catalog's rate for two.
    from emulator.runpod import RunpodApi
    from infra.runpod_backend.catalog import RUNPOD_GPUS
    from training.lifecycle import with_billed_rate

    gpu = "NVIDIA GeForce RTX 4090"
    api = RunpodApi(api_key="account-key")
    with serve(api) as url:
        body = {"name": "lorastack-t", "image": "ghcr.io/lorastack/trainer:0.1.0", "gpu": {"id": gpu, "count": 2}}
        pod = requests.post(f"{url}/v2/pods", json=body, headers={"Authorization": "Bearer account-key"}, timeout=10).json()
        environ = {"RUNPOD_POD_ID": pod["id"], "RUNPOD_API_KEY": api.pod_api_key(pod["id"]), "RUNPOD_API_BASE_URL": url}
        limits = with_billed_rate(RunLimits(max_hours=1, max_cost_usd=1, usd_per_hour=0.10), environ)
        assert limits.usd_per_hour == pytest.approx(2 * RUNPOD_GPUS[gpu].secure_usd)
        # unreachable API: the table's rate stands, the run goes on
        unreachable = environ | {"RUNPOD_API_BASE_URL": "http://127.0.0.1:9"}
        assert with_billed_rate(RunLimits(max_hours=1, max_cost_usd=1, usd_per_hour=0.10), unreachable).usd_per_hour == 0.10
    assert with_billed_rate(RunLimits(max_hours=1, max_cost_usd=1, usd_per_hour=0.10), {}).usd_per_hour == 0.10
