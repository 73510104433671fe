"""The Vast.ai e2e setup: emulator/vast.py whose instances run the real trainer, an S3 API (moto) as the stack's
bucket, and the example stack brought up by the offline driver with the demo's tiny training."""

from __future__ import annotations

import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudapi.run_mirror import RunMirror
from emulator.server import serve
from emulator.stack_driver import StackDriver
from emulator.vast import VastApi, VastRuntime, offer
from infra import paths

from ..s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, s3_server
from .conftest import demo_config

STACK = "sdxl-vast-4090"
BUCKET = "lorastack-e2e"
USD_PER_HOUR = 0.5


@dataclass
class VastEmulated:
    api: VastApi
    runtime: VastRuntime
    s3: S3Server
    api_key: str
    state_dir: Path

    def overrides(self, train: dict | None = None, limits: dict | None = None) -> dict:
        demo = demo_config()
        return {
            "lorastack:wait": False,
            "lorastack:train": {**demo["lorastack:train"], **(train or {})},
            "lorastack:limits": {**demo["lorastack:limits"], **(limits or {})},
            "lorastack:vast": {"gpuName": "RTX 4090", "gpuCount": 1, "minReliability": 0.98,
                               "maxUsdPerHour": USD_PER_HOUR, "diskGb": 20, "verified": True,
                               "bucket": {"url": f"s3://{BUCKET}/e2e", "endpoint": self.s3.endpoint, "region": REGION}},
        }

    def driver(self, **changes) -> StackDriver:
        return StackDriver(STACK, self.state_dir, overrides=self.overrides(**changes), secrets={
            "vastApiKey": self.api_key, "bucketAccessKeyId": ACCESS_KEY, "bucketSecretAccessKey": SECRET_KEY})

    @property
    def mirror(self) -> RunMirror:
        return RunMirror.from_settings(f"s3://{BUCKET}/e2e", self.s3.endpoint, aws_access_key_id=ACCESS_KEY,
                                       aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def logs(self, instance_id: str) -> list[str]:
        with self.api.lock:
            record = self.api.instances.get(int(instance_id)) or self.api.destroyed.get(int(instance_id))
            return list(record.logs) if record else []

    def wait_for(self, condition, what: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture
def vast(tmp_path, monkeypatch, seed):
    api_key = "vast-e2e-" + secrets.token_hex(6)
    runtime = VastRuntime(tmp_path / "vast", seed_disk=lambda disk: shutil.copytree(seed, disk, dirs_exist_ok=True),
                          extra_env={"OMP_NUM_THREADS": "2"})
    offers = [offer(number, "RTX 4090", USD_PER_HOUR - 0.01 * number) for number in range(1, 4)]
    api = VastApi(api_key, offers, runtime)
    with s3_server(BUCKET) as s3, serve(api) as url:
        runtime.base_url = url
        monkeypatch.setenv("VAST_URL", url)
        monkeypatch.setenv("VAST_API_KEY", api_key)
        monkeypatch.setenv("LORASTACK_OUTPUTS_DIR", str(tmp_path / "outputs"))
        monkeypatch.setattr(paths, "OUTPUTS_DIR", tmp_path / "outputs")
        for name, value in s3.environ().items():  # what `make fetch` / `make status` read
            monkeypatch.setenv(name, value)
        try:
            yield VastEmulated(api, runtime, s3, api_key, tmp_path / "state")
        finally:
            runtime.shutdown()
