"""Fixtures for the Lambda Cloud e2e tests: emulator/lambda_cloud.py whose instances boot the real trainer as a
local process (TrainerBoot), and the shipped stack sdxl-lambda-h100 made tiny (the demo's model, dataset, steps
and limits) and brought up and down by the offline driver over the real program and providers.

conftest.py imports the fixtures, so every test module of this folder can name them; `seed` and `faults`
come from conftest.py.
"""

from __future__ import annotations

import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudapi.lambda_rest import LambdaClient
from contract.workspace import RunPaths, read_json
from emulator.lambda_cloud import BootRuntime, LambdaCloudApi, TrainerBoot
from emulator.server import serve
from emulator.stack_driver import StackDriver
from infra import paths
from training import checkpoints

from .conftest import demo_config

STACK = "sdxl-lambda-h100"
INSTANCE_TYPE = "gpu_1x_a10"
REGION = "us-south-2"


def overrides(train: dict | None = None, limits: dict | None = None, keep_filesystem: bool = True) -> dict:
    """The Lambda stack with the demo's tiny training (its model and dataset are seeded onto the filesystem)."""
    demo = demo_config()
    return {
        "lorastack:wait": False,
        "lorastack:lambda": {"instanceType": INSTANCE_TYPE, "region": REGION, "sshKeyName": "e2e",
                             "filesystem": {"keepOnDestroy": keep_filesystem}},
        "lorastack:limits": {**demo["lorastack:limits"], **(limits or {})},
        "lorastack:train": {**demo["lorastack:train"], **(train or {})},
    }


@dataclass
class LambdaEmulated:
    api: LambdaCloudApi
    runtime: BootRuntime
    url: str
    api_key: str
    state_dir: Path

    @property
    def client(self) -> LambdaClient:
        return LambdaClient(self.api_key, base_url=self.url, backoff=0.05, launch_interval_s=0)

    def driver(self, **changes) -> StackDriver:
        return StackDriver(STACK, self.state_dir, secrets={"lambdaApiKey": self.api_key}, overrides=overrides(**changes))

    def logs(self, instance_id: str) -> list[str]:
        with self.api.lock:
            return list(self.api.record(instance_id).logs)

    def wait_for_log(self, instance_id: str, pattern: str, timeout: float) -> re.Match:
        deadline, compiled = time.monotonic() + timeout, re.compile(pattern)
        while time.monotonic() < deadline:
            for line in self.logs(instance_id):
                if match := compiled.search(line):
                    return match
            time.sleep(0.05)
        raise AssertionError(f"no log line like {pattern!r} in {timeout} s; log tail: {self.logs(instance_id)[-15:]}")

    def filesystem_paths(self, outputs: dict) -> RunPaths:
        (filesystem_id,) = [fs["id"] for fs in self.api.filesystems.values() if fs["name"] == outputs["filesystem"]]
        return RunPaths(self.runtime.filesystem_dir(filesystem_id), outputs["runId"])

    def status(self, outputs: dict) -> dict:
        return read_json(self.filesystem_paths(outputs).status) or {}

    def container_exits(self, instance_id: str) -> list[str]:
        return [line for line in self.logs(instance_id) if line.startswith("container exited")]

    @staticmethod
    def wait_for_checkpoint(run: RunPaths, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while checkpoints.latest(run) is None:
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.05)


def _start(tmp_path, monkeypatch, runtime: BootRuntime) -> tuple[LambdaEmulated, object]:
    api_key = "e2e-lambda-" + secrets.token_hex(8)
    api = LambdaCloudApi(api_key=api_key, runtime=runtime, launch_interval_s=0.5)
    server = serve(api)
    url = server.__enter__()
    if isinstance(runtime, TrainerBoot):
        runtime.base_url = url
    monkeypatch.setenv("LAMBDA_API_BASE_URL", url)
    monkeypatch.setenv("LAMBDA_API_KEY", api_key)
    monkeypatch.setenv("LORASTACK_OUTPUTS_DIR", str(tmp_path / "outputs"))
    monkeypatch.setattr(paths, "OUTPUTS_DIR", tmp_path / "outputs")
    return LambdaEmulated(api, runtime, url, api_key, tmp_path / "state"), server


@pytest.fixture
def lambda_cloud(tmp_path, monkeypatch, seed, faults):
    """Lambda's API with instances that boot `python -m training` on this machine."""
    runtime = TrainerBoot(tmp_path / "lambda", seed_filesystem=lambda d: shutil.copytree(seed, d, dirs_exist_ok=True),
                          extra_env={"OMP_NUM_THREADS": "2"}, stop_grace_s=10, faults=faults)
    emulated, server = _start(tmp_path, monkeypatch, runtime)
    try:
        yield emulated
    finally:
        runtime.shutdown()
        server.__exit__(None, None, None)


@pytest.fixture
def lambda_api_only(tmp_path, monkeypatch):
    """Lambda's API with instances that only go active (no trainer): for what is about the API alone."""
    emulated, server = _start(tmp_path, monkeypatch, BootRuntime())
    try:
        yield emulated
    finally:
        server.__exit__(None, None, None)
