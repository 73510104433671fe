"""The Hugging Face Jobs emulator whose jobs run the real trainer (emulator/hf_hub.py), and the flux-hfjobs stack
made to train the demo's tiny SD 1.5 on this machine. Imported by the hfjobs e2e tests (fixtures by import)."""

from __future__ import annotations

import copy
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from contract.naming import run_id
from emulator.hf_hub import HfHubApi
from emulator.pods import PodFaults
from emulator.server import serve
from emulator.stack_driver import StackDriver
from infra.config import StackConfig
from infra.stack_files import parse_stack, stack_file

from ..test_hfjobs import contract_violations
from .conftest import demo_config

STACK = "flux-hfjobs"


def stack_config() -> dict:
    return (yaml.safe_load(stack_file(STACK).read_text()) or {})["config"]


def overrides(train: dict | None = None, limits: dict | None = None, keep_repo: bool | None = None) -> dict:
    """flux-hfjobs with the demo's training (tiny SD 1.5 from the job's seeded disk) and the given changes."""
    config = copy.deepcopy(stack_config())
    changed = {"lorastack:train": {**demo_config()["lorastack:train"], **(train or {})}}
    if limits:
        changed["lorastack:limits"] = {**config["lorastack:limits"], **limits}
    if keep_repo is not None:
        section = config["lorastack:hfjobs"]
        section["checkpointRepo"]["keepOnDestroy"] = keep_repo
        changed["lorastack:hfjobs"] = section
    return changed


@dataclass
class HfEmulated:
    api: HfHubApi
    token: str
    state_dir: Path

    def driver(self, **changes) -> StackDriver:
        return StackDriver(STACK, self.state_dir, secrets={"hfToken": self.token}, overrides=overrides(**changes))

    def config(self, driver: StackDriver) -> StackConfig:
        return parse_stack(driver.config(), STACK)

    def run_id(self, driver: StackDriver) -> str:
        return run_id(STACK, self.config(driver).train)

    @property
    def repo_id(self) -> str:
        return stack_config()["lorastack:hfjobs"]["checkpointRepo"]["repoId"]

    def repo_files(self) -> set[str]:
        with self.api.lock:
            repo = self.api.repos.get(self.repo_id)
            return set(repo.files) if repo else set()

    def logs(self, job_id: str) -> list[str]:
        with self.api.lock:
            return [line for _, line in self.api.jobs[job_id].logs]

    def wait_for_log(self, job_id: str, pattern: str, timeout: float) -> re.Match:
        deadline, compiled = time.monotonic() + timeout, re.compile(pattern)
        while time.monotonic() < deadline:
            for line in self.logs(job_id):
                if match := compiled.search(line):
                    return match
            time.sleep(0.05)
        raise AssertionError(f"no log line like {pattern!r} in {timeout} s; log tail: {self.logs(job_id)[-15:]}")

    def wait_ended(self, job_id: str, timeout: float = 240) -> str:
        assert self.api.wait_until_ended(job_id, timeout), f"job still {self.api.jobs[job_id].stage}; " \
                                                           f"log tail: {self.logs(job_id)[-15:]}"
        return self.api.jobs[job_id].stage


@pytest.fixture
def hf_faults() -> PodFaults:
    return PodFaults()


@pytest.fixture
def hf_emulated(tmp_path, monkeypatch, seed, hf_faults):
    token = "hf_e2e_" + secrets.token_hex(8)
    user = stack_config()["lorastack:hfjobs"]["checkpointRepo"]["repoId"].split("/")[0]
    api = HfHubApi(tmp_path / "hf", token=token, user=user, faults=hf_faults, stop_grace_s=10,
                   seed=lambda disk: shutil.copytree(seed, disk, dirs_exist_ok=True),
                   extra_env={"OMP_NUM_THREADS": "2"})
    with serve(api) as url:
        api.base_url = url
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", token)
        try:
            yield HfEmulated(api, token, tmp_path / "state")
        finally:
            api.shutdown()
        # what the providers, the ops hooks and the trainer inside the jobs sent, against the contract notes
        assert contract_violations(api) == []
