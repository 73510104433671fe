"""Reporter (progress line, status.json) and Lifecycle (limits, SIGTERM, watchdog, stopping the pod)
against a small fake of RunPod's pod-action endpoint."""

from __future__ import annotations

import io
import json
import os
import signal
import threading

import pytest

from contract.progress import parse_progress
from contract.spec import RunLimits, TrainSpec
from contract.workspace import RunPaths, read_json
from emulator.server import ApiError, Fault, JsonApi, Request, serve
from training.lifecycle import EXIT_STALLED, EXIT_STOP_FAILED, Lifecycle, already_done
from training.tracking import Reporter, redact

POD_KEY = "rpa_pod_scoped_secret_123"
HF_TOKEN = "hf_very_secret_token_456"


class PodActions(JsonApi):
    """POST /v2/pods/{id}/action, recorded; only the pod's own key is accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.actions: list[tuple[str, str]] = []
        self.route("POST", "/v2/pods/{pod_id}/action", self._action)

    def authorize(self, request: Request) -> None:
        if request.headers.get("authorization") != f"Bearer {POD_KEY}":
            raise ApiError(401, "bad key")

    def _action(self, request: Request) -> dict:
        self.actions.append((request.params["pod_id"], request.body["action"]))
        return {"id": request.params["pod_id"], "desiredStatus": "EXITED"}


@pytest.fixture
def runpod():
    api = PodActions()
    with serve(api) as url:
        yield api, {"RUNPOD_POD_ID": "pod123", "RUNPOD_API_KEY": POD_KEY, "RUNPOD_API_BASE_URL": url, "HF_TOKEN": HF_TOKEN}


@pytest.fixture
def paths(tmp_path):
    return RunPaths(tmp_path, "run-1")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


LIMITS = RunLimits(max_hours=2, max_cost_usd=1.0, stall_minutes=20, usd_per_hour=0.6)


def spec() -> TrainSpec:
    return TrainSpec(family="sd15", base_model="tiny/sd15", dataset={"source": "/data"}, resolution=512, steps=100)


# -- Lifecycle --------------------------------------------------------------------------------------------


def test_success_writes_done_and_stops_the_pod(runpod, paths):
    api, environ = runpod
    assert not already_done(paths)
    with Lifecycle(LIMITS, paths, environ) as life:
        life.beat(1)
        life.finish("succeeded")
    assert already_done(paths)
    assert read_json(paths.done)["step"] == 1
    assert api.actions == [("pod123", "stop")]


def test_exception_inside_stops_the_pod_and_records_the_failure(runpod, paths):
    api, environ = runpod
    with pytest.raises(RuntimeError, match="boom"):
        with Lifecycle(LIMITS, paths, environ):
            raise RuntimeError(f"boom while using {HF_TOKEN}")
    status = read_json(paths.status)
    assert status["state"] == "failed" and "boom" in status["message"]
    assert HF_TOKEN not in json.dumps(status)
    assert api.actions == [("pod123", "stop")]
    assert not already_done(paths)


def test_failure_callback_replaces_the_default_status_write(runpod, paths):
    api, environ = runpod
    seen = []
    with pytest.raises(ValueError):
        with Lifecycle(LIMITS, paths, environ, on_failure=seen.append):
            raise ValueError("bad batch")
    assert [type(error) for error in seen] == [ValueError]
    assert "state" not in read_json(paths.status)  # no default failure write: the callback's job (only the ledger)
    assert api.actions == [("pod123", "stop")]


def test_leaving_without_finish_still_stops_the_pod(runpod, paths):
    api, environ = runpod
    with Lifecycle(LIMITS, paths, environ):
        pass
    assert api.actions == [("pod123", "stop")] and not already_done(paths)


def test_local_run_stops_nothing(paths):
    life = Lifecycle(LIMITS, paths, environ={})
    life.finish("succeeded")
    assert already_done(paths)


def test_stop_failure_exits_non_zero(runpod, paths, capsys):
    api, environ = runpod
    api.inject(Fault(status=503, count=10))  # more failures than the client retries
    life = Lifecycle(LIMITS, paths, environ, stop_retries=1, stop_backoff_s=0.01)
    with pytest.raises(SystemExit) as exit_info:
        life.finish("failed")
    assert exit_info.value.code == EXIT_STOP_FAILED
    assert "could not stop pod pod123" in capsys.readouterr().err


def test_a_failed_stop_after_success_keeps_the_succeeded_status(runpod, paths):
    api, environ = runpod
    api.inject(Fault(status=503, count=10))
    with pytest.raises(SystemExit):
        with Lifecycle(LIMITS, paths, environ, stop_retries=0) as life:
            life.finish("succeeded")
    assert already_done(paths) and "state" not in read_json(paths.status)  # no "failed" written over the success
    assert api.requests == [("POST", "/v2/pods/pod123/action")]  # stop tried once, not again on the way out


def test_stop_is_retried_through_transient_errors(runpod, paths):
    api, environ = runpod
    api.inject(Fault(status=503, count=2, retry_after="0"))
    Lifecycle(LIMITS, paths, environ, stop_retries=3, stop_backoff_s=0.01).finish("limit")
    assert api.actions == [("pod123", "stop")]


def test_time_limit_requests_a_stop(paths):
    clock = FakeClock()
    life = Lifecycle(RunLimits(max_hours=1, max_cost_usd=100, usd_per_hour=0.5), paths, {}, clock)
    clock.now += 3599
    life.beat(10)
    assert not life.stop_requested.is_set()
    clock.now += 2
    life.beat(11)
    assert life.stop_requested.is_set() and life.reason.startswith("time limit")


def test_money_limit_requests_a_stop(paths):
    clock = FakeClock()
    life = Lifecycle(RunLimits(max_hours=10, max_cost_usd=1.0, usd_per_hour=2.0), paths, {}, clock)
    clock.now += 29 * 60  # $0.97
    life.beat(5)
    assert not life.stop_requested.is_set()
    clock.now += 2 * 60  # $1.03
    life.beat(6)
    assert life.stop_requested.is_set() and life.reason.startswith("money limit")
    assert "$1.03" in life.reason


def test_watchdog_stops_the_pod_when_beats_stop(runpod, paths):
    api, environ = runpod
    exited = threading.Event()
    codes = []

    def fake_exit(code):
        codes.append(code)
        exited.set()

    life = Lifecycle(RunLimits(max_hours=1, max_cost_usd=10, stall_minutes=0.005), paths, environ, exit_process=fake_exit)
    life.start()
    try:
        life.beat(3)
        assert exited.wait(5), "the watchdog did not fire"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert codes == [EXIT_STALLED]
    assert api.actions == [("pod123", "stop")]
    status = read_json(paths.status)
    assert status["state"] == "stalled" and "after step 3" in status["message"]


def test_beats_keep_the_watchdog_quiet(runpod, paths):
    api, environ = runpod
    exit_codes = []
    life = Lifecycle(RunLimits(max_hours=1, max_cost_usd=10, stall_minutes=0.01), paths, environ, exit_process=exit_codes.append)
    life.start()
    pause = threading.Event()
    for step in range(8):  # 0.8 s of beats, longer than the 0.6 s stall limit
        life.beat(step)
        pause.wait(0.1)
    life.finish("succeeded")
    status = read_json(paths.status)
    assert exit_codes == [] and "state" not in status  # the watchdog never fired (only the run's ledger is there)
    assert api.actions == [("pod123", "stop")]


def test_sigterm_requests_a_stop(paths):
    previous = signal.getsignal(signal.SIGTERM)
    life = Lifecycle(LIMITS, paths, {}).start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert life.stop_requested.wait(2)
        assert "SIGTERM" in life.reason
    finally:
        life.finish("interrupted")
    assert signal.getsignal(signal.SIGTERM) == previous  # finish() restored the handler


# -- Reporter ---------------------------------------------------------------------------------------------


def test_reporter_writes_status_and_progress_lines(paths):
    clock, out = FakeClock(), io.StringIO()
    reporter = Reporter(paths, spec(), LIMITS, "run-1", total_steps=100, clock=clock, out=out, environ={}, progress_every_s=5)
    for step in range(1, 11):
        clock.now += 2.0
        reporter.step(step, loss=0.1, lr=1e-4)
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 1/100 loss 0.1000 lr 1.0e-04 2.00 s/step ETA 3m18s cost $0.00 (est. $0.03)"
    # each update: the line for people, then the record `make status` reads (contract/progress.py)
    records = [parse_progress(line) for line in lines[1::2]]
    assert all(parse_progress(line) is None for line in lines[::2])
    assert [(r.state, r.step, r.total) for r in records] == [("running", step, 100) for step in (1, 4, 7, 10)]
    assert len(lines) == 8  # the first step, then once 5 s have passed: steps 4, 7, 10
    assert (records[0].loss, records[0].seconds_per_step, records[0].eta) == (0.1, 2.0, "3m18s")
    status = read_json(paths.status)
    assert status["state"] == "running" and status["run_id"] == "run-1"
    assert (status["step"], status["total"]) == (10, 100)
    assert status["seconds_per_step"] == pytest.approx(2.0)
    assert status["eta_seconds"] == pytest.approx(180.0)
    assert status["cost_usd"] == pytest.approx(0.6 * 20 / 3600, abs=1e-4)
    assert status["started_at"].endswith("Z") and status["updated_at"].endswith("Z")

    reporter.finish("succeeded", "trained 100 steps", {"kohya": paths.lora / "x.safetensors"})
    status = read_json(paths.status)
    assert status["state"] == "succeeded" and status["message"] == "trained 100 steps"
    assert status["outputs"] == {"kohya": str(paths.lora / "x.safetensors")}
    assert out.getvalue().splitlines()[-2].startswith("succeeded: trained 100 steps (step 10/100")
    final = parse_progress(out.getvalue().splitlines()[-1])
    assert (final.state, final.step, final.total, final.cost_usd) == ("succeeded", 10, 100, status["cost_usd"])


def test_reporter_never_shows_secrets(paths):
    environ = {"HF_TOKEN": HF_TOKEN, "RUNPOD_API_KEY": POD_KEY, "WANDB_API_KEY": "wandb_secret_789", "STEPS": "100"}
    out = io.StringIO()
    reporter = Reporter(paths, spec(), LIMITS, "run-1", total_steps=100, out=out, environ=environ)
    reporter.step(1, 0.5, 1e-4)
    reporter.finish("failed", f"upload with {HF_TOKEN} and {POD_KEY} refused", {"log": f"/x/{POD_KEY}"})
    shown = out.getvalue() + paths.status.read_text()
    for secret in (HF_TOKEN, POD_KEY, "wandb_secret_789"):
        assert secret not in shown
    assert "***" in shown


def test_reporter_saves_samples(paths):
    from PIL import Image

    out = io.StringIO()
    reporter = Reporter(paths, spec(), LIMITS, "run-1", total_steps=10, out=out, environ={})
    saved = reporter.samples(5, [Image.new("RGB", (8, 8), "red")] * 2, ["a photo of sks", "sks dog"])
    assert [path.relative_to(paths.run).as_posix() for path in saved] == [
        "samples/step-000005/00-a-photo-of-sks.png",
        "samples/step-000005/01-sks-dog.png",
    ]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in saved)


def test_reporter_logs_to_wandb_offline_without_a_key(paths, monkeypatch):
    calls = {}

    class FakeRun:
        summary: dict = {}

        def log(self, values, step):
            calls.setdefault("log", []).append((step, sorted(values)))

        def finish(self, exit_code):
            calls["finish"] = exit_code

    class FakeWandb:
        Settings = dict

        @staticmethod
        def init(**kwargs):
            calls["init"] = kwargs
            return FakeRun()

    monkeypatch.setitem(__import__("sys").modules, "wandb", FakeWandb)
    with_project = spec().model_copy(update={"wandb_project": "loras"})
    reporter = Reporter(paths, with_project, LIMITS, "run/1", total_steps=10, out=io.StringIO(), environ={})
    reporter.step(1, 0.5, 1e-4)
    reporter.finish("limit", "time limit")
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "loras"
    assert calls["init"]["dir"] == str(paths.run / "wandb") and calls["init"]["id"] == "run-1"
    assert calls["log"] == [(1, ["loss", "lr", "seconds_per_step"])]
    assert calls["finish"] == 1


def test_redact_replaces_only_secret_looking_variables():
    environ = {"MY_API_KEY": "abcdef123", "HOME": "/root/home", "SHORT_TOKEN": "ab"}
    assert redact("key abcdef123 in /root/home, ab", environ) == "key *** in /root/home, ab"
