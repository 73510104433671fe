"""Fixtures for the local backend's tests: the Docker Engine API emulator on a free port, DOCKER_HOST pointing at
it (the real `docker` SDK in the program's providers and in the test talks to it), and a driver for a local stack
whose folder is the test's."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import docker
import yaml

from emulator.docker_engine import DockerEngineApi
from emulator.server import serve
from emulator.stack_driver import StackDriver
from infra.stack_files import stack_file

STACK = "sd15-local"


def stack_config() -> dict:
    return (yaml.safe_load(stack_file(STACK).read_text()) or {})["config"]


@dataclass
class LocalEngine:
    api: DockerEngineApi
    url: str
    folder: Path
    state_dir: Path

    @property
    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url.replace("http://", "tcp://"), version="1.47", timeout=30)

    def driver(self, local: dict | None = None, train: dict | None = None, limits: dict | None = None,
               image: dict | None = None, secrets: dict | None = None) -> StackDriver:
        config = copy.deepcopy(stack_config())
        changed = {"lorastack:local": {**config["lorastack:local"], "folder": str(self.folder), **(local or {})}}
        if train:  # a whole section: the e2e tests train the demo's tiny model instead
            changed["lorastack:train"] = train
        if limits:
            changed["lorastack:limits"] = {**config["lorastack:limits"], **limits}
        if image:
            changed["lorastack:image"] = image
        return StackDriver(STACK, self.state_dir, secrets=secrets, overrides=changed)


def start(tmp_path: Path, monkeypatch, api: DockerEngineApi):
    server = serve(api)
    url = server.__enter__()
    monkeypatch.setenv("DOCKER_HOST", url.replace("http://", "tcp://"))
    for variable in ("DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "HF_TOKEN", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    return LocalEngine(api, url, tmp_path / "folder", tmp_path / "state"), server
