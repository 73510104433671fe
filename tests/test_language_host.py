"""The program as `pulumi up` runs it (emulator/language_host.py): a language-host subprocess in infra/, the SDK's
own dynamic-provider host, a JSON state per stack with its secrets encrypted.

Every shipped stack goes up, previews an unchanged update as no change, and is destroyed: the RunPod stacks
against emulator/runpod.py (pods that only report RUNNING; `wait: false`, so nothing trains here: tests/e2e
runs the demo stack's real training through the same driver), flux-replicate against emulator/replicate.py.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from pulumi.runtime import rpc

from emulator.lambda_cloud import LambdaCloudApi
from emulator.language_host import (
    Deployment,
    MockedResources,
    Operations,
    ProgramError,
    Project,
    StackState,
    cli_config,
    is_secret,
    run_program,
)
from emulator.replicate import FakeClock, ReplicateApi
from emulator.runpod import PodRuntime, RunpodApi
from emulator.server import serve
from emulator.stack_driver import StackDriver
from infra.stack_files import STACKS_DIR

RUNPOD_KEY = "rpa_language_host_test_key_5ec7e7"
HF_TOKEN = "hf_language_host_test_token_b0a710"
REPLICATE_TOKEN = "r8_language_host_test_token_fade"
LAMBDA_KEY = "secret_language_host_lambda_key_c0ffee"
STACKS = {
    path.name.removeprefix("Pulumi.").removesuffix(".yaml"): (yaml.safe_load(path.read_text()) or {})["config"]
    for path in sorted(STACKS_DIR.glob("Pulumi.*.yaml"))
}
POD_TYPE = "pulumi-python:dynamic/runpod:Pod"


@pytest.fixture
def runpod(monkeypatch):
    api = RunpodApi(api_key=RUNPOD_KEY, runtime=PodRuntime())
    with serve(api) as url:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", url)
        for variable in ("RUNPOD_API_KEY", "HF_TOKEN", "WANDB_API_KEY", "REPLICATE_API_TOKEN"):
            monkeypatch.delenv(variable, raising=False)
        yield api


@pytest.fixture
def replicate(monkeypatch):
    owner = STACKS["flux-replicate"]["lorastack:replicate"]["owner"]
    # a training ends as soon as it is created: `wait: true` has nothing to wait for
    api = ReplicateApi(tokens=(REPLICATE_TOKEN,), account=owner, clock=FakeClock(), start_seconds=0, run_seconds=0)
    with serve(api) as url:
        monkeypatch.setenv("REPLICATE_BASE_URL", url)
        monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
        yield api


@pytest.fixture
def lambda_cloud(monkeypatch):
    api = LambdaCloudApi(api_key=LAMBDA_KEY, launch_interval_s=0.5)  # instances only go active: nothing trains here
    with serve(api) as url:
        monkeypatch.setenv("LAMBDA_API_BASE_URL", url)
        monkeypatch.delenv("LAMBDA_API_KEY", raising=False)
        yield api


def runpod_driver(stack: str, state_dir: Path, **overrides) -> StackDriver:
    overrides = {"lorastack:wait": False, **{f"lorastack:{key}": value for key, value in overrides.items()}}
    return StackDriver(stack, state_dir, secrets={"runpodApiKey": RUNPOD_KEY, "hfToken": HF_TOKEN}, overrides=overrides)


def state_file(state_dir: Path, stack: str) -> Path:
    return state_dir / f"{stack}.json"


def assert_no_plain_secrets(path: Path, *values: str) -> None:
    text = path.read_text()
    for value in values:
        assert value not in text
    document = json.loads(text)
    for resource in document["resources"]:
        if "__provider" in resource["inputs"]:  # the pickled provider is a secret: ciphertext only
            stored = resource["inputs"]["__provider"]
            assert is_secret(stored) and "ciphertext" in stored and "value" not in stored


@pytest.mark.parametrize("stack", sorted(name for name, config in STACKS.items() if config["lorastack:provider"] == "runpod"))
def test_a_runpod_stack_goes_up_previews_no_change_and_is_destroyed(stack, runpod, tmp_path):
    driver = runpod_driver(stack, tmp_path)
    keeps_volume = (STACKS[stack]["lorastack:runpod"].get("volume") or {}).get("keepOnDestroy", True)

    outputs, operations = driver.up()
    assert operations.counts == {"create": 2}
    (pod,) = runpod.pods.values()
    assert outputs["podId"] == pod.id and outputs["volumeId"] in runpod.volumes
    assert_no_plain_secrets(state_file(tmp_path, stack), RUNPOD_KEY, HF_TOKEN)

    written = state_file(tmp_path, stack).read_text()
    previewed, preview = driver.preview()
    assert preview.counts == {"same": 2} and preview.changes == 0
    assert previewed["podId"] == pod.id
    assert state_file(tmp_path, stack).read_text() == written  # a preview writes nothing

    destroyed = driver.destroy()
    assert destroyed.counts == ({"delete": 1, "retain": 1} if keeps_volume else {"delete": 2})
    assert runpod.pods == {} and bool(runpod.volumes) is keeps_volume
    assert json.loads(state_file(tmp_path, stack).read_text())["resources"] == []


def test_the_replicate_stack_goes_up_previews_no_change_and_is_destroyed(replicate, tmp_path):
    settings = STACKS["flux-replicate"]["lorastack:replicate"]
    model = f"{settings['owner']}/{settings['model']}"
    driver = StackDriver("flux-replicate", tmp_path, secrets={"replicateApiToken": REPLICATE_TOKEN})
    outputs, operations = driver.up()
    assert operations.counts == {"create": 3}  # model, training, deployment
    assert outputs["status"] == "succeeded" and outputs["version"].startswith(model + ":")
    assert_no_plain_secrets(state_file(tmp_path, "flux-replicate"), REPLICATE_TOKEN)

    _, preview = driver.preview()
    assert preview.counts == {"same": 3} and preview.changes == 0

    replicate.clock.advance(15 * 60 + 1)  # Replicate deletes a deployment only after 15 minutes offline
    destroyed = driver.destroy()
    assert destroyed.counts == {"delete": 2, "retain": 1}  # the model (the LoRA's versions) is kept
    assert replicate.deployments == {} and model in replicate.models


def test_a_replicate_dataset_url_keeps_its_credentials_encrypted_and_a_new_signature_retrains_nothing(
    replicate, tmp_path
):
    def driver(signature: str) -> StackDriver:
        train = {**STACKS["flux-replicate"]["lorastack:train"]}
        train["dataset"] = {"source": f"https://alice:s3cr3t-pass@data.example.com/style.zip?X-Amz-Signature={signature}"}
        return StackDriver("flux-replicate", tmp_path, secrets={"replicateApiToken": REPLICATE_TOKEN},
                           overrides={"lorastack:train": train})

    _, operations = driver("0f1e2d3c4b5a6978").up()
    assert operations.counts == {"create": 3}
    (training,) = replicate.trainings.values()
    assert training.input["input_images"].startswith("https://alice:s3cr3t-pass@")  # Replicate gets the whole URL
    assert_no_plain_secrets(state_file(tmp_path, "flux-replicate"), "s3cr3t-pass", "0f1e2d3c4b5a6978")
    # the URL signed again an hour later is the same dataset: nothing is replaced, nothing trains again
    _, preview = driver("99aa88bb77cc66dd").preview()
    assert "replace" not in preview.counts and "create" not in preview.counts, preview.counts


@pytest.mark.parametrize("stack", sorted(name for name, config in STACKS.items() if config["lorastack:provider"] == "lambda"))
def test_a_lambda_stack_goes_up_previews_no_change_and_is_destroyed(stack, lambda_cloud, tmp_path):
    driver = StackDriver(stack, tmp_path, secrets={"lambdaApiKey": LAMBDA_KEY, "hfToken": HF_TOKEN})
    keeps_filesystem = (STACKS[stack]["lorastack:lambda"].get("filesystem") or {}).get("keepOnDestroy", True)

    outputs, operations = driver.up()
    assert operations.counts == {"create": 2}
    (instance,) = lambda_cloud.instances.values()
    assert outputs["instanceId"] == instance.id and instance.filesystems[0]["name"] == outputs["filesystem"]
    assert LAMBDA_KEY in instance.user_data  # the trainer needs it to terminate itself: Lambda got it ...
    assert_no_plain_secrets(state_file(tmp_path, stack), LAMBDA_KEY, HF_TOKEN)  # ... the state holds it sealed

    _, preview = driver.preview()
    assert preview.counts == {"same": 2} and preview.changes == 0

    destroyed = driver.destroy()
    assert destroyed.counts == ({"delete": 1, "retain": 1} if keeps_filesystem else {"delete": 2})
    assert lambda_cloud.billing() == [] and bool(lambda_cloud.filesystems) is keeps_filesystem


def test_the_preview_of_a_new_stack_creates_nothing(runpod, tmp_path):
    outputs, operations = runpod_driver("demo", tmp_path).preview()
    assert operations.counts == {"create": 2}
    assert runpod.pods == {} and runpod.volumes == {} and not state_file(tmp_path, "demo").exists()
    assert outputs["podId"] == rpc.UNKNOWN and outputs["runId"].startswith("demo-")  # known only after `up`


def test_an_update_a_replacement_and_a_resource_no_longer_declared(runpod, tmp_path):
    first, _ = runpod_driver("demo", tmp_path).up()
    volume_id = first["volumeId"]

    limits = {**STACKS["demo"]["lorastack:limits"], "stallMinutes": 7}
    _, updated = runpod_driver("demo", tmp_path, limits=limits).up()
    assert updated.counts == {"same": 1, "update": 1}  # the pod's env changes in place
    assert list(runpod.pods) == [first["podId"]]

    other_gpu = {**STACKS["demo"]["lorastack:runpod"], "gpuType": "NVIDIA RTX A5000"}
    replaced, operations = runpod_driver("demo", tmp_path, limits=limits, runpod=other_gpu).up()
    assert operations.counts == {"same": 1, "replace": 1}
    assert list(runpod.pods) == [replaced["podId"]] != [first["podId"]]  # the old pod went first (one trainer)

    without_volume = {**other_gpu, "volume": None, "checkpointsLostWithContainer": True, "dataCenter": None,
                      "cloud": "COMMUNITY"}
    _, operations = runpod_driver("demo", tmp_path, limits=limits, runpod=without_volume).up()
    assert operations.counts == {"replace": 1, "delete": 1}  # the volume the stack no longer declares is deleted
    assert volume_id not in runpod.volumes


def test_refresh_drops_a_pod_deleted_outside_pulumi(runpod, tmp_path):
    driver = runpod_driver("demo", tmp_path)
    outputs, _ = driver.up()
    runpod.terminate(outputs["podId"])
    assert driver.refresh().counts == {"gone": 1}
    assert_no_plain_secrets(state_file(tmp_path, "demo"), RUNPOD_KEY, HF_TOKEN)  # what was read back stays sealed
    _, operations = driver.up()
    assert operations.counts == {"same": 1, "create": 1}


def test_a_failing_program_deletes_nothing(runpod, tmp_path):
    driver = runpod_driver("demo", tmp_path)
    outputs, _ = driver.up()
    resources = {urn: resource.id for urn, resource in StackState(state_file(tmp_path, "demo")).resources.items()}
    bad_train = {**STACKS["demo"]["lorastack:train"], "learningRate": 0.5}
    with pytest.raises(ProgramError, match=r"Pulumi.demo.yaml: lorastack:train.learningRate = 0.5"):
        runpod_driver("demo", tmp_path, train=bad_train).up()
    # the program declared nothing before it failed; `pulumi up` deletes what is undeclared only after a success
    kept = {urn: resource.id for urn, resource in StackState(state_file(tmp_path, "demo")).resources.items()}
    assert kept == resources and list(runpod.pods) == [outputs["podId"]]


def test_the_state_does_not_open_with_another_passphrase(runpod, tmp_path, monkeypatch):
    runpod_driver("demo", tmp_path).up()
    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE", "not the one it was written with")
    with pytest.raises(ProgramError, match="PULUMI_CONFIG_PASSPHRASE"):
        StackState(state_file(tmp_path, "demo"))


PROBE_PROGRAM = """
    import os
    import sys

    import pulumi

    config = pulumi.Config("probe")
    pulumi.export("cwd", os.getcwd())
    pulumi.export("argv", sys.argv)
    pulumi.export("path0", sys.path[0])
    pulumi.export("scriptDir", sorted(os.listdir(sys.path[1])))
    pulumi.export("plain", config.get("plain"))
    pulumi.export("number", config.get_int("number"))
    pulumi.export("flag", config.get_bool("flag"))
    pulumi.export("object", config.get_object("object"))
    pulumi.export("token", config.require_secret("token"))
    pulumi.export("dryRun", pulumi.runtime.is_dry_run())
    pulumi.export("stack", pulumi.get_stack())
"""


@pytest.fixture
def probe_project(tmp_path) -> Project:
    (tmp_path / "Pulumi.yaml").write_text("name: probe\nruntime:\n  name: python\nmain: program/\n")
    (tmp_path / "program").mkdir()
    (tmp_path / "program" / "__main__.py").write_text(textwrap.dedent(PROBE_PROGRAM))
    return Project.load(tmp_path)


@pytest.mark.parametrize("dry_run", [False, True], ids=["up", "preview"])
def test_the_program_runs_as_the_language_host_runs_it(probe_project, tmp_path, dry_run):
    config, secret_keys = cli_config(
        {"probe:plain": "text", "probe:number": 3, "probe:flag": True, "probe:object": {"a": [1, 2]}},
        {"probe:token": "s3cret-token"}, "Pulumi.probe.yaml")
    assert config["probe:plain"] == "text" and config["probe:number"] == "3" and config["probe:flag"] == "true"
    assert json.loads(config["probe:object"]) == {"a": [1, 2]} and secret_keys == ["probe:token"]

    state = StackState(tmp_path / "state" / "probe.json")
    deployment = Deployment(state, lambda: pytest.fail("no provider is needed"), dry_run, Operations())
    outputs = run_program(probe_project, "dev", config, secret_keys, deployment, {}, dry_run, _logger())

    assert outputs["cwd"] == str(probe_project.main) and outputs["argv"] == ["."]
    assert outputs["path0"] == "."  # runpy.run_path(".") puts the program directory first
    assert outputs["scriptDir"] == ["pulumi-language-python-exec"]  # the exec script's directory holds nothing else
    assert (outputs["plain"], outputs["number"], outputs["flag"]) == ("text", 3, True)
    assert outputs["object"] == {"a": [1, 2]} and outputs["token"] == "s3cret-token"
    assert outputs["dryRun"] is dry_run and outputs["stack"] == "dev"
    if not dry_run:
        assert is_secret(state.outputs["token"])  # a secret config value stays secret in the outputs
        assert "s3cret-token" not in state.path.read_text()


def test_a_program_error_is_reported_with_its_message(probe_project):
    (probe_project.main / "__main__.py").write_text("raise ValueError('lorastack:thing: not allowed here')\n")
    operations = Operations()
    with pytest.raises(ProgramError, match="lorastack:thing: not allowed here"):
        run_program(probe_project, "dev", {}, [], MockedResources(None, operations), {}, False, _logger())


def test_a_value_encrypted_by_the_cli_is_refused_with_the_key():
    with pytest.raises(ProgramError, match="Pulumi.x.yaml: lorastack:hfToken"):
        cli_config({"lorastack:hfToken": {"secure": "v1:abc"}}, {}, "Pulumi.x.yaml")


def _logger():
    import logging

    return logging.getLogger("tests.language_host")


@pytest.mark.parametrize("stack", sorted(name for name, config in STACKS.items() if config["lorastack:provider"] == "local"))
def test_a_local_stack_goes_up_previews_no_change_and_is_destroyed(stack, tmp_path, monkeypatch):
    from emulator.docker_engine import DockerEngineApi

    api = DockerEngineApi(run_trainers=False)  # containers only report running: nothing trains here
    settings = {**STACKS[stack]["lorastack:local"], "folder": str(tmp_path / "folder")}
    driver = StackDriver(stack, tmp_path / "state", secrets={"hfToken": HF_TOKEN}, overrides={"lorastack:local": settings})
    with serve(api) as url:
        monkeypatch.setenv("DOCKER_HOST", url.replace("http://", "tcp://"))
        outputs, operations = driver.up()
        assert operations.counts == {"create": 2}  # the folder and the container
        assert list(api.containers) == [outputs["containerId"]]
        assert_no_plain_secrets(state_file(tmp_path / "state", stack), HF_TOKEN)
        _, preview = driver.preview()
        assert preview.counts == {"same": 2} and preview.changes == 0
        kept = settings.get("keepOnDestroy", True)
        assert driver.destroy().counts == ({"delete": 1, "retain": 1} if kept else {"delete": 2})
        assert api.containers == {} and (tmp_path / "folder").is_dir() is kept


@pytest.fixture
def hfjobs(monkeypatch, tmp_path):
    from emulator.hf_hub import HfHubApi

    namespace = STACKS["flux-hfjobs"]["lorastack:hfjobs"]["checkpointRepo"]["repoId"].split("/")[0]
    # no trainer runs here (trainer_repositories=()): the job is only RUNNING, as a FLUX run would be for hours
    api = HfHubApi(tmp_path / "hf", token=HF_TOKEN, user=namespace, trainer_repositories=())
    with serve(api) as url:
        api.base_url = url
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield api
    api.shutdown()


def test_the_hfjobs_stack_goes_up_previews_no_change_and_is_destroyed(hfjobs, tmp_path):
    from infra.hfjobs_backend.catalog import FINAL_CHECKPOINT_S

    settings = STACKS["flux-hfjobs"]["lorastack:hfjobs"]
    driver = StackDriver("flux-hfjobs", tmp_path, secrets={"hfToken": HF_TOKEN})
    outputs, operations = driver.up()
    assert operations.counts == {"create": 2}  # the checkpoint repo and the job
    (job,) = hfjobs.jobs.values()
    assert outputs["jobId"] == job.id and job.spec["flavor"] == settings["flavor"]
    # maxCostUsd 6 buys 1.2 h at h200's $5.00/h (< maxHours 1.5), and the trainer's last checkpoint needs its time
    assert job.spec["timeoutSeconds"] == 72 * 60 + FINAL_CHECKPOINT_S
    assert job.spec["secrets"]["HF_TOKEN"] == HF_TOKEN and HF_TOKEN not in json.dumps(job.spec["environment"])
    assert_no_plain_secrets(state_file(tmp_path, "flux-hfjobs"), HF_TOKEN)

    _, preview = driver.preview()
    assert preview.counts == {"same": 2} and preview.changes == 0

    destroyed = driver.destroy()
    assert destroyed.counts == {"delete": 1, "retain": 1}  # the job is canceled, the repo with the checkpoints kept
    assert job.stage == "CANCELED" and hfjobs.billing_jobs() == []
    assert settings["checkpointRepo"]["repoId"] in hfjobs.repos


VAST_KEY = "vast_language_host_test_key_7a11e5"
BUCKET_KEYS = {"bucketAccessKeyId": "AKIA_LANGUAGE_HOST_TEST", "bucketSecretAccessKey": "bucket_secret_language_host_test"}


@pytest.mark.parametrize("stack", sorted(name for name, config in STACKS.items() if config["lorastack:provider"] == "vast"))
def test_a_vast_stack_goes_up_previews_no_change_and_is_destroyed(stack, tmp_path, monkeypatch):
    from emulator.vast import VastApi, offer

    settings = STACKS[stack]["lorastack:vast"]
    api = VastApi(VAST_KEY, [offer(7, settings["gpuName"], settings["maxUsdPerHour"] - 0.01,
                                   num_gpus=settings.get("gpuCount", 1), disk_space=2 * settings.get("diskGb", 80))])
    with serve(api) as url:
        monkeypatch.setenv("VAST_URL", url)
        for variable in ("VAST_API_KEY", "HF_TOKEN", "WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(variable, raising=False)
        driver = StackDriver(stack, tmp_path, secrets={"vastApiKey": VAST_KEY, "hfToken": HF_TOKEN, **BUCKET_KEYS})
        outputs, operations = driver.up()
        assert operations.counts == {"create": 1}
        (instance,) = api.instances.values()
        assert outputs["instanceId"] == str(instance.id) and instance.label == f"lorastack-{stack}"
        assert instance.env["AWS_SECRET_ACCESS_KEY"] == BUCKET_KEYS["bucketSecretAccessKey"]
        assert_no_plain_secrets(state_file(tmp_path, stack), VAST_KEY, HF_TOKEN, *BUCKET_KEYS.values())

        _, preview = driver.preview()
        assert preview.counts == {"same": 1} and preview.changes == 0
        assert driver.destroy().counts == {"delete": 1}
        assert api.instances == {} and 7 in api.offers  # nothing bills; the bucket is the user's and untouched
