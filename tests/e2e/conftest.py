"""The whole flow on this machine: the RunPod emulator whose pods run the real trainer as processes
(emulator/pods.py), stacks brought up and down by the offline driver over the real program and providers.

Budget: the e2e suite must stay within a few minutes on two cores, so every run trains the tiny SD 1.5 for a
handful of steps, and only the tests about the trainer start trainer processes.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cloudapi.runpod_rest import RunpodClient
from contract.workspace import RunPaths, read_json
from emulator.pods import PROBE_PREFIX, PodFaults, ProcessRuntime
from emulator.runpod import PodRuntime, RunpodApi
from emulator.server import serve
from emulator.stack_driver import StackDriver
from infra import paths
from infra.runpod_backend.follow import ENV_VOLUME_MOUNTS
from infra.stack_files import stack_file
from training import checkpoints, tiny

STACK = "demo"


@pytest.fixture(scope="session")
def seed(tmp_path_factory) -> Path:
    """What the demo stack expects on its volume: models/tiny-sd15 and datasets/demo."""
    folder = tmp_path_factory.mktemp("seed")
    tiny.make_model("sd15", folder / "models" / "tiny-sd15")
    tiny.make_dataset(folder / "datasets" / "demo", 4)
    return folder


def demo_config() -> dict:
    return (yaml.safe_load(stack_file(STACK).read_text()) or {})["config"]


def overrides(wait: bool = False, train: dict | None = None, limits: dict | None = None, keep_volume: bool | None = None,
              volume_gb: int | None = None) -> dict:
    """`lorastack:*` values replacing the demo stack's."""
    config = copy.deepcopy(demo_config())
    changed = {"lorastack:wait": wait}
    if train:
        changed["lorastack:train"] = {**config["lorastack:train"], **train}
    if limits:
        changed["lorastack:limits"] = {**config["lorastack:limits"], **limits}
    if keep_volume is not None or volume_gb is not None:
        runpod = config["lorastack:runpod"]
        if keep_volume is not None:
            runpod["volume"]["keepOnDestroy"] = keep_volume
        if volume_gb is not None:
            runpod["volume"]["sizeGb"] = volume_gb
        changed["lorastack:runpod"] = runpod
    return changed


@dataclass
class Emulated:
    api: RunpodApi
    runtime: PodRuntime
    url: str
    api_key: str
    state_dir: Path

    @property
    def client(self) -> RunpodClient:
        return RunpodClient(self.api_key, base_url=self.url, backoff=0.05)

    def driver(self, **changes) -> StackDriver:
        return StackDriver(STACK, self.state_dir, secrets={"runpodApiKey": self.api_key}, overrides=overrides(**changes))

    def logs(self, pod_id: str) -> list[str]:
        with self.api.lock:
            pod = self.api.pods.get(pod_id)
            return [line.line for line in pod.logs] if pod else []

    def wait_for_log(self, pod_id: str, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in self.logs(pod_id):
                match = compiled.search(line)
                if match:
                    return match
            time.sleep(0.05)
        raise AssertionError(f"no log line like {pattern!r} in {timeout} s; log tail: {self.logs(pod_id)[-15:]}")

    def volume_paths(self, volume_id: str, run_id: str) -> RunPaths:
        return RunPaths(self.runtime.volume_dir(volume_id), run_id)

    def status(self, volume_id: str, run_id: str) -> dict:
        return read_json(self.volume_paths(volume_id, run_id).status) or {}

    @staticmethod
    def wait_for_checkpoint(paths: RunPaths, timeout: float = 180) -> None:  # generous: only a failure waits it out
        deadline = time.monotonic() + timeout
        while checkpoints.latest(paths) is None:
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.05)


def probe_steps(lines: list[str]) -> list[int]:
    return [int(line[len(PROBE_PREFIX):]) for line in lines if line.startswith(PROBE_PREFIX)]


def start_emulator(tmp_path, monkeypatch, runtime: PodRuntime):
    api_key = "e2e-" + secrets.token_hex(8)
    api = RunpodApi(api_key=api_key, runtime=runtime)
    server = serve(api)
    url = server.__enter__()
    if isinstance(runtime, ProcessRuntime):
        runtime.base_url = url
    monkeypatch.setenv("RUNPOD_API_BASE_URL", url)
    monkeypatch.setenv("RUNPOD_API_KEY", api_key)
    # the follower runs in the program's process (started like the language host does): only the environment reaches it
    monkeypatch.setenv("LORASTACK_OUTPUTS_DIR", str(tmp_path / "outputs"))
    monkeypatch.setattr(paths, "OUTPUTS_DIR", tmp_path / "outputs")
    if isinstance(runtime, ProcessRuntime):
        monkeypatch.setenv(ENV_VOLUME_MOUNTS, str(runtime.root / "volumes"))
    return Emulated(api, runtime, url, api_key, tmp_path / "state"), server


@pytest.fixture
def faults() -> PodFaults:
    """Set before the first pod starts; read by every trainer process the runtime starts."""
    return PodFaults()


@pytest.fixture
def emulated(tmp_path, monkeypatch, seed, faults):
    """The emulator with pods that run `python -m training` on this machine."""
    runtime = ProcessRuntime(
        tmp_path / "emulator",
        seed_volume=lambda volume: shutil.copytree(seed, volume, dirs_exist_ok=True),
        extra_env={"OMP_NUM_THREADS": "2"},
        stop_grace_s=10,
        faults=faults,
    )
    emulated, server = start_emulator(tmp_path, monkeypatch, runtime)
    try:
        yield emulated
    finally:
        runtime.shutdown()
        server.__exit__(None, None, None)


@pytest.fixture
def api_only(tmp_path, monkeypatch):
    """The emulator with pods that only report RUNNING (no trainer): for what is about the API alone."""
    emulated, server = start_emulator(tmp_path, monkeypatch, PodRuntime())
    try:
        yield emulated
    finally:
        server.__exit__(None, None, None)


def json_env(value: dict) -> str:
    return json.dumps(value, separators=(",", ":"))


# The other backends' fixtures live in their own modules (they build on demo_config and seed above); imported here,
# at the end, pytest offers them to every module of this folder the way it offers this file's own
from .hfjobs_fixtures import hf_emulated, hf_faults  # noqa: E402, F401
from .lambda_fixtures import lambda_api_only, lambda_cloud  # noqa: E402, F401
from .vast_setup import vast  # noqa: E402, F401
