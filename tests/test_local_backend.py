"""The local backend against the Docker Engine API emulator, through the real `docker` SDK and the offline engine:
every request our providers send is one the Engine API's swagger defines; `up` without an engine says so in one
line while check and preview need none; creates survive 429, 5xx and lost answers without a second container;
the reaper stops our containers past their limits and leaves the rest."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from contract.naming import run_id
from contract.spec import ENV_LIMITS
from contract.workspace import RunPaths, atomic_write_json
from emulator.docker_engine import DockerEngineApi
from emulator.server import Fault
from emulator.stack_driver import ProgramError
from infra import backends
from infra.local_backend import reap as reap_rules
from infra.local_backend.container import ContainerProvider
from infra.stack_files import load_stack

from .local_engine import STACK, start

CONTRACT = json.loads((Path(__file__).parent / "data" / "docker_engine_api.json").read_text())
# query parameters the docker SDK adds on its own that the swagger does not list (the engine ignores them)
SDK_EXTRAS = {("GET", "/containers/json"): {"trunc_cmd"}}


@pytest.fixture
def engine(tmp_path, monkeypatch):
    api = DockerEngineApi(run_trainers=False)
    local, server = start(tmp_path, monkeypatch, api)
    try:
        yield local
    finally:
        server.__exit__(None, None, None)


def swagger_path(path: str) -> str | None:
    """The swagger template a request path matches, the /v1.xx prefix taken off."""
    bare = path.split("/", 2)[2] if path.startswith("/v1.") else path.lstrip("/")
    bare = "/" + bare
    for template in CONTRACT["paths"]:
        pattern = template.replace("{name}", ".+").replace("{id}", "[^/]+")
        if re.fullmatch(pattern, bare):
            return template
    return None


def assert_within_contract(api: DockerEngineApi) -> None:
    assert api.sent
    for request in api.sent:
        template = swagger_path(request.path)
        assert template is not None, f"{request.method} {request.path}: no such path in the Engine API"
        allowed = CONTRACT["paths"][template]
        assert request.method in allowed, f"{request.method} {template}: not a method of that path"
        unknown = set(request.query) - set(allowed[request.method]) - SDK_EXTRAS.get((request.method, template), set())
        assert not unknown, f"{request.method} {template}: query parameters {unknown} are not in the Engine API"
        if template == "/containers/create":
            body = request.body
            assert set(body) <= set(CONTRACT["containerCreateBody"]), set(body) - set(CONTRACT["containerCreateBody"])
            host = body["HostConfig"]
            assert set(host) <= set(CONTRACT["hostConfig"]), set(host) - set(CONTRACT["hostConfig"])
            for device in host["DeviceRequests"]:
                assert set(device) <= set(CONTRACT["deviceRequest"])
            assert set(host["RestartPolicy"]) <= set(CONTRACT["restartPolicy"])


def test_up_preview_destroy_send_only_what_the_engine_api_defines(engine):
    driver = engine.driver()
    outputs, operations = driver.up()
    assert operations.counts == {"create": 2}
    (container,) = engine.api.containers.values()
    assert outputs["containerId"] == container.id and container.status == "running"
    host = container.config["HostConfig"]
    assert host["Binds"] == [f"{engine.folder}:/workspace:rw"]
    assert host["DeviceRequests"][0]["Count"] == -1 and host["DeviceRequests"][0]["Capabilities"] == [["gpu"]]
    assert host["RestartPolicy"]["Name"] == "no"
    assert container.labels["lorastack.stack"] == STACK and container.labels["lorastack.managed"] == "1"
    env = dict(entry.partition("=")[::2] for entry in container.config["Env"])
    assert env["LORASTACK_WORKSPACE"] == "/workspace" and json.loads(env[ENV_LIMITS])["usdPerHour"] == 0.15

    engine.api.sent.clear()
    _, preview = driver.preview()
    assert preview.counts == {"same": 2} and engine.api.sent == []  # a preview of no change asks the engine nothing

    assert driver.destroy().counts == {"delete": 1, "retain": 1}
    assert engine.api.containers == {} and engine.folder.is_dir()  # the folder is kept (keepOnDestroy)
    assert_within_contract(engine.api)


def test_a_folder_not_kept_is_deleted_on_destroy(engine):
    driver = engine.driver(local={"keepOnDestroy": False})
    driver.up()
    (engine.folder / "runs").mkdir()
    assert driver.destroy().counts == {"delete": 2}
    assert not engine.folder.exists() and engine.api.containers == {}


def test_without_an_engine_check_and_preview_work_and_up_says_what_to_start(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")  # nothing listens there
    local, server = start(tmp_path, monkeypatch, DockerEngineApi(run_trainers=False))
    server.__exit__(None, None, None)
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")
    driver = local.driver()
    _, preview = driver.preview()
    assert preview.counts == {"create": 2}
    with pytest.raises(ProgramError) as raised:
        driver.up()
    message = str(raised.value)
    assert "no Docker engine at tcp://127.0.0.1:9: start Docker Desktop / dockerd, or use make train-local" in message
    assert "Traceback" not in message


def test_create_survives_bursts_and_a_lost_answer_without_a_second_container(engine, monkeypatch):
    retries, backoff, _ = ContainerProvider.__init__.__defaults__
    monkeypatch.setattr(ContainerProvider.__init__, "__defaults__", (retries, 0.05, 2.0))
    create = "/v1.47/containers/create"
    engine.api.inject(Fault(status=429, method="POST", path_prefix=create, retry_after="0"))
    engine.api.inject(Fault(status=500, method="POST", path_prefix=create))
    engine.api.inject(Fault(status=503, method="GET", path_prefix="/v1.47/containers/json"))
    engine.api.inject(Fault(status=0, delay=2.5, method="POST", path_prefix=create))  # made after the client gave up
    outputs, operations = engine.driver().up()
    assert operations.counts == {"create": 2}
    assert list(engine.api.containers) == [outputs["containerId"]]
    creates = [r for r in engine.api.sent if r.method == "POST" and r.path == create]
    assert len(creates) == 3  # refused twice, then made once (its answer lost): found by name, not made again
    assert engine.api.containers[outputs["containerId"]].status == "running"

    engine.api.inject(Fault(status=0, delay=2.5, method="POST", path_prefix="/v1.47/containers/"))  # stop, lost
    engine.api.inject(Fault(status=502, method="DELETE", path_prefix="/v1.47/containers/"))
    assert engine.driver().destroy().counts == {"delete": 1, "retain": 1}
    assert engine.api.containers == {}


def test_the_reaper_stops_ours_past_their_limits_and_leaves_the_rest(engine):
    client = engine.client
    client.images.pull("ghcr.io/lorastack/trainer:0.1.0")
    limits = json.dumps({"maxHours": 1, "maxCostUsd": 0.1, "usdPerHour": 0.5})

    def run(name: str, stack: str | None, env: dict) -> str:
        labels = {"lorastack.managed": "1", "lorastack.stack": stack} if stack else {}
        container = client.containers.create("ghcr.io/lorastack/trainer:0.1.0", name=name, environment=env, labels=labels)
        container.start()
        return container.id

    within = run("lorastack-within", "live", {ENV_LIMITS: limits})
    money = run("lorastack-money", "live", {ENV_LIMITS: limits})
    orphan = run("lorastack-orphan", "gone", {ENV_LIMITS: limits})
    unlimited = run("lorastack-unlimited", "live", {})
    foreign = run("someone-elses", None, {})
    started = datetime.now(UTC)
    engine.api.containers[money].started_at = (started - timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    decisions = {d.resource_id: d for d in reap_rules.reap(client, {"live"}, dry_run=False, now=started + timedelta(minutes=1),
                                                           grace_minutes=10)}
    assert not decisions[within[:12]].terminate
    assert decisions[money[:12]].terminate and "maxCostUsd" in decisions[money[:12]].reason
    assert decisions[orphan[:12]].terminate and "no live stack" in decisions[orphan[:12]].reason
    assert decisions[unlimited[:12]].terminate and "limits" in decisions[unlimited[:12]].reason
    assert foreign[:12] not in decisions
    assert sorted(engine.api.containers) == sorted([within, foreign])


def test_status_logs_and_fetch_read_the_container_and_the_folder(engine):
    outputs, _ = engine.driver().up()
    stack_config = load_stack(STACK)
    config = stack_config.model_copy(update={"local": stack_config.local.model_copy(update={"folder": str(engine.folder)})})
    backend, environ = backends.get("local"), {"DOCKER_HOST": engine.url.replace("http://", "tcp://")}
    run = RunPaths(engine.folder, run_id(STACK, config.train))
    run.run.mkdir(parents=True)
    atomic_write_json(run.status, {"state": "running", "step": 120, "total": 800, "loss": 0.1234})
    (line,) = backend.status(STACK, config, environ).lines
    assert "container running" in line and "running at step 120/800, loss 0.1234" in line

    container = engine.api.containers[outputs["containerId"]]
    container.logs += [b"step 1\n", b"step 2\n"]
    engine.client.containers.get(container.id).stop(timeout=1)
    emitted: list[str] = []
    backend.logs(STACK, config, environ, emitted.append)  # follows until the container has exited
    assert emitted == ["step 1", "step 2"]

    with pytest.raises(backends.OpsError, match="no LoRA yet"):
        backend.fetch(STACK, config, engine.folder.parent / "out", environ)
    run.lora.mkdir()
    (run.lora / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    report = backend.fetch(STACK, config, engine.folder.parent / "out", environ)
    assert (engine.folder.parent / "out" / "pytorch_lora_weights.safetensors").read_bytes() == b"weights"
    assert "has not finished" in report.lines[0]
    engine.driver().destroy()


def test_the_policy_pack_passes_the_shipped_container_and_refuses_an_unlimited_or_unpinned_one():
    from infra.runpod_backend.component import pod_env

    from .test_policy import all_violations

    config = load_stack(STACK)
    container_type = "pulumi-python:dynamic/local:Container"
    props = {"name": "lorastack-sd15-local", "stack": STACK, "image": config.image.ref, "env": pod_env(STACK, config, {}),
             "folder": "/home/me/.cache/lorastack/sd15-local", "gpus": "all", "shmSizeGb": 8, "user": "1000:1000"}
    assert all_violations(container_type, props) == []
    env = {key: value for key, value in props["env"].items() if key != ENV_LIMITS}
    found = all_violations(container_type, {**props, "image": "ghcr.io/lorastack/trainer:latest", "env": env})
    assert any("'latest'" in line for line in found) and any("maxHours" in line for line in found)


@pytest.mark.parametrize(("changes", "said"), [
    ({"lorastack:wait": True}, "lorastack:wait: true is not offered by provider local"),
    ({"lorastack:local": {"gpuType": "RTX 4090"}}, "local.gpuType = 'RTX 4090': unknown GPU name"),
    ({"lorastack:local": {"gpuType": "NVIDIA GeForce RTX 3060", "folder": "relative/path"}}, "local.folder"),
])
def test_a_bad_local_section_names_the_key_and_what_is_allowed(changes, said):
    from infra.stack_files import StackError, parse_stack, stack_file

    raw = {**(yaml.safe_load(stack_file(STACK).read_text()) or {})["config"], **changes}
    with pytest.raises(StackError) as raised:
        parse_stack(raw, "stacks/Pulumi.sd15-local.yaml")
    assert any(said in line for line in raised.value.problems), raised.value.problems


def test_the_reaper_has_nothing_to_do_without_an_engine():
    assert backends.get("local").reap({STACK}, {"DOCKER_HOST": "tcp://127.0.0.1:9"}, dry_run=False, grace_minutes=10) == []
