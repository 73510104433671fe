"""The Replicate dynamic providers against emulator/replicate.py, through the real `replicate` client over HTTP.

Each provider goes through what the Pulumi host does with it: pickled by Pulumi's serializer, unpickled,
`configure()`d with the stack config (the token); the tests then drive check/create/read/diff/update/delete.
"""

from __future__ import annotations

import base64
import hashlib
import io
import time
import zipfile
from pathlib import Path

import dill
import httpx
import pytest
from pulumi.dynamic import Config, ConfigureRequest
from pulumi.dynamic.dynamic import serialize_provider
from replicate.exceptions import ReplicateError

from emulator.replicate import TRAINER, TRAINER_VERSION, FakeClock, ReplicateApi
from emulator.server import Fault, serve
from infra.replicate_backend.client import ReplicateClient, retry_after_seconds
from infra.replicate_backend.deployment import DeploymentProvider
from infra.replicate_backend.model import ModelProvider
from infra.replicate_backend.provider import ReplicateProvider
from infra.replicate_backend.training import TrainingProvider, dataset_zip

TOKEN = "r8_provider_test_token_0123456789"
HF_TOKEN = "hf_secret_value_never_in_outputs"
FAST = {"backoff": 0.01, "max_wait": 2.0}


@pytest.fixture(scope="module")
def server():
    api = ReplicateApi(tokens=(TOKEN,), account="alice")
    with serve(api) as base_url:
        yield api, base_url


@pytest.fixture
def api(server, monkeypatch):
    emulator, base_url = server
    emulator.reset()
    emulator.clock = FakeClock()
    emulator.start_seconds, emulator.run_seconds, emulator.outcome = 10.0, 100.0, "succeeded"
    monkeypatch.setenv("REPLICATE_BASE_URL", base_url)
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    return emulator


def advance(api: ReplicateApi, seconds: float) -> None:
    api.clock.advance(seconds)
    api.settle()


def hosted(provider: ReplicateProvider, token: str | None = TOKEN) -> ReplicateProvider:
    """The provider as the Pulumi host runs it: serialized as Pulumi does, unpickled, configured."""
    revived = dill.loads(base64.b64decode(serialize_provider(provider)))
    revived.configure(ConfigureRequest(Config({"lorastack:replicateApiToken": token} if token else {}, "lorastack")))
    return revived


def model_props(**overrides) -> dict:
    return {"owner": "alice", "name": "lora", "visibility": "private", "hardware": "gpu-h100",
            "description": "a LoRA", "keepOnDestroy": True, **overrides}


def dataset(folder: Path, caption: str = "a photo of TOK") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(2):
        (folder / f"img{index}.png").write_bytes(b"\x89PNG fake image %d" % index)
        (folder / f"img{index}.caption").write_text(f"{caption} {index}")
    return folder


def training_props(source: str, **overrides) -> dict:
    return {
        "destination": "alice/lora", "trainer": TRAINER, "trainerVersion": None,
        "trainerInput": {"steps": 100, "lora_rank": 16, "learning_rate": 4e-4, "batch_size": 1,
                         "resolution": "1024", "autocaption": False, "trigger_word": "TOK"},
        "datasetSource": source, "captionExtension": ".caption", "defaultCaption": "",
        "hfToken": None, "wandbApiKey": None, "wait": False, "maxSeconds": 3600.0, "maxCostUsd": 10.0,
        "usdPerSecond": 0.001525, **overrides,
    }


def checked(provider: TrainingProvider, props: dict) -> dict:
    result = provider.check({}, props)
    assert not result.failures, [f.reason for f in result.failures]
    return result.inputs


def training_provider() -> TrainingProvider:
    return hosted(TrainingProvider(poll_seconds=0.01, **FAST))


def create_model(api: ReplicateApi, **overrides) -> dict:
    return hosted(ModelProvider(**FAST)).create(model_props(**overrides)).outs


# --------------------------------------------------------------------------------------------- model


def test_model_create_read_update_and_keep_on_destroy(api):
    provider = hosted(ModelProvider(**FAST))
    created = provider.create(model_props())
    assert created.id == "alice/lora"
    assert created.outs["url"] == "https://replicate.com/alice/lora"
    assert created.outs["latestVersion"] is None
    assert api.models["alice/lora"].visibility == "private"

    changed = model_props(description="better words")
    assert provider.diff(created.id, created.outs, changed).replaces == []
    assert provider.diff(created.id, created.outs, model_props(name="other")).replaces == ["name"]
    provider.update(created.id, created.outs, changed)
    assert api.models["alice/lora"].description == "better words"
    assert provider.read(created.id, created.outs).outs["description"] == "better words"

    provider.delete(created.id, created.outs)  # keepOnDestroy: nothing is deleted
    assert "alice/lora" in api.models
    again = provider.create(model_props())  # a kept model is adopted by the next `pulumi up`
    assert again.id == "alice/lora"
    with pytest.raises(RuntimeError, match="cannot change a model's visibility"):
        provider.update(created.id, created.outs, model_props(visibility="public"))


def test_model_delete_with_versions_is_explained_not_attempted(api):
    provider = hosted(ModelProvider(**FAST))
    outs = provider.create(model_props(keepOnDestroy=False)).outs
    trainings = training_provider()
    trainings.create(checked(trainings, training_props("https://example.com/data.zip")))
    advance(api, 200)
    version = api.models["alice/lora"].versions[0]["id"]
    deletes_before = [r for r in api.requests if r[0] == "DELETE"]
    with pytest.raises(RuntimeError) as error:
        provider.delete("alice/lora", outs)
    message = str(error.value)
    assert "only private models that have no versions" in message
    assert version in message and f"/v1/models/alice/lora/versions/{version}" in message
    assert [r for r in api.requests if r[0] == "DELETE"] == deletes_before  # not attempted
    assert "alice/lora" in api.models

    ReplicateClient(TOKEN, **FAST).delete_version("alice/lora", version)  # as the message says
    provider.delete("alice/lora", outs)
    assert "alice/lora" not in api.models
    provider.delete("alice/lora", outs)  # already gone: nothing to do


def test_model_gone_outside_pulumi_reads_as_deleted(api):
    provider = hosted(ModelProvider(**FAST))
    outs = provider.create(model_props()).outs
    del api.models["alice/lora"]
    assert provider.read("alice/lora", outs).id == ""


def test_a_429_on_post_is_retried_after_retry_after(api):
    api.inject(Fault(status=429, count=2, method="POST", path_prefix="/v1/models", retry_after="0.2"))
    started = time.monotonic()
    create_model(api)
    assert time.monotonic() - started >= 0.4
    assert [r for r in api.requests if r == ("POST", "/v1/models")] == [("POST", "/v1/models")] * 3
    assert "alice/lora" in api.models


def test_a_patch_meeting_503_is_retried(api):
    provider = hosted(ModelProvider(**FAST))
    outs = provider.create(model_props()).outs
    api.inject(Fault(status=503, count=1, method="PATCH", path_prefix="/v1/models/alice/lora"))
    provider.update("alice/lora", outs, model_props(description="new"))
    assert api.models["alice/lora"].description == "new"


def test_retry_after_forms():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 10) == pytest.approx(10.0)
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


# ------------------------------------------------------------------------------------------ training


def test_training_waits_to_success_with_a_new_version_and_weights(api, tmp_path, capsys):
    api.clock, api.start_seconds, api.run_seconds = time.time, 0.05, 0.15  # real time, tiny phases
    create_model(api)
    provider = training_provider()
    props = checked(provider, training_props(str(dataset(tmp_path / "data")), wait=True, hfToken=HF_TOKEN,
                                              trainerInput={**training_props("")["trainerInput"], "hf_repo_id": "alice/lora"}))
    assert props["datasetFingerprint"].startswith("sha256:")
    result = provider.create(props)
    outs = result.outs
    assert outs["status"] == "succeeded"
    assert outs["trainerVersion"] == TRAINER_VERSION  # resolved from the trainer's latest version, recorded
    assert outs["version"] == api.models["alice/lora"].versions[0]["id"]
    assert outs["versionRef"] == f"alice/lora:{outs['version']}"
    assert outs["weights"].endswith("trained_model.tar")
    assert outs["trainingUrl"] == f"https://replicate.com/p/{result.id}"
    sent = api.trainings[result.id].input
    assert sent["hf_token"] == HF_TOKEN and sent["trigger_word"] == "TOK"
    assert sent["input_images"] == outs["imagesUrl"]
    assert HF_TOKEN not in repr(outs) and "hfToken" not in outs
    assert "[replicate] training" in capsys.readouterr().err

    assert provider.read(result.id, outs).outs["version"] == outs["version"]
    same = checked(provider, training_props(str(tmp_path / "data"), wait=True, hfToken="hf_rotated",
                                            trainerInput=props["trainerInput"]))
    assert provider.diff(result.id, outs, same).changes is False  # a rotated token does not retrain
    more_steps = {**same, "trainerInput": {**same["trainerInput"], "steps": 200}}
    diff = provider.diff(result.id, outs, more_steps)
    assert diff.replaces == ["trainerInput"] and diff.delete_before_replace


def test_training_failure_fails_create_with_the_error_and_logs(api):
    api.clock, api.start_seconds, api.run_seconds = time.time, 0.02, 0.05
    create_model(api)
    api.plan_outcome("failed")
    provider = training_provider()
    with pytest.raises(RuntimeError) as error:
        provider.create(checked(provider, training_props("https://example.com/data.zip", wait=True)))
    assert "ended failed" in str(error.value) and "CUDA out of memory" in str(error.value)
    assert "last log lines" in str(error.value)


def test_aborted_training_is_read_and_reported(api):
    create_model(api)
    provider = training_provider()
    api.plan_outcome("aborted")
    outs = provider.create(checked(provider, training_props("https://example.com/data.zip"))).outs
    assert outs["status"] == "starting"
    advance(api, 10)
    assert provider.read(outs["trainingId"], outs).outs["status"] == "aborted"  # the client's trainings.get fails here
    provider.delete(outs["trainingId"], outs)  # nothing to cancel

    api.clock, api.start_seconds = time.time, 0.02
    api.plan_outcome("aborted")
    with pytest.raises(RuntimeError, match="aborted before it started running"):
        provider.create(checked(provider, training_props("https://example.com/data.zip", wait=True)))


def test_destroying_a_running_training_cancels_it(api):
    create_model(api)
    provider = training_provider()
    outs = provider.create(checked(provider, training_props("https://example.com/data.zip"))).outs
    advance(api, 20)
    assert api.trainings[outs["trainingId"]].status == "processing"
    provider.delete(outs["trainingId"], outs)
    assert api.trainings[outs["trainingId"]].status == "canceled"
    assert ("POST", f"/v1/trainings/{outs['trainingId']}/cancel") in api.requests


def test_waiting_past_the_time_limit_cancels(api):
    api.clock, api.start_seconds, api.run_seconds = time.time, 0.01, 30.0
    create_model(api)
    provider = training_provider()
    with pytest.raises(RuntimeError, match="time limit"):
        provider.create(checked(provider, training_props("https://example.com/data.zip", wait=True, maxSeconds=0.1)))
    (training,) = api.trainings.values()
    assert training.status == "canceled"


def test_dataset_zip_is_uploaded_once_per_content_hash(api, tmp_path):
    create_model(api)
    provider = training_provider()
    folder = dataset(tmp_path / "data")
    first = provider.create(checked(provider, training_props(str(folder)))).outs
    second = provider.create(checked(provider, training_props(str(folder)))).outs
    assert len(api.files) == 1
    assert first["imagesUrl"] == second["imagesUrl"]
    (file,) = api.files.values()
    archive = dataset_zip(folder, ".caption")
    assert api.file_content(file["id"]) == archive
    assert file["checksums"]["sha256"] == hashlib.sha256(archive).hexdigest()

    names = zipfile.ZipFile(io.BytesIO(archive)).namelist()
    assert names == ["img0.png", "img0.txt", "img1.png", "img1.txt"]  # captions renamed to .txt

    (folder / "img1.caption").write_text("a different caption")
    changed = checked(provider, training_props(str(folder)))
    assert changed["datasetFingerprint"] != first["datasetFingerprint"]
    assert provider.diff(first["trainingId"], first, changed).replaces == ["datasetFingerprint"]
    provider.create(changed)
    assert len(api.files) == 2


def test_dataset_sources_the_trainer_cannot_take_fail_check(tmp_path):
    provider = TrainingProvider()
    for source, reason in (("https://example.com/data.tar.gz", ".zip"), (str(tmp_path / "missing"), "not a folder"),
                           ("someone/some-dataset", "Hugging Face")):
        failures = provider.check({}, training_props(source)).failures
        assert failures and reason in failures[0].reason, source
    leaked = training_props("https://example.com/d.zip", trainerInput={"hf_token": "hf_x"})
    assert any("secret" in f.reason for f in provider.check({}, leaked).failures)


def test_a_500_on_training_create_does_not_start_two(api):
    create_model(api)
    api.inject(Fault(status=500, count=1, method="POST", path_prefix="/v1/models/ostris"))
    provider = training_provider()
    provider.create(checked(provider, training_props("https://example.com/data.zip")))
    assert len(api.trainings) == 1


# A lost answer: the server made the thing, then the answer never came (a reset connection, or a 5xx sent after
# the work). Every create must find what it made before posting again.
LOST_ANSWERS = {"reset": 0, "502 after the work": 502}


@pytest.mark.parametrize("status", LOST_ANSWERS.values(), ids=LOST_ANSWERS.keys())
def test_a_lost_training_create_answer_does_not_start_two(api, status):
    create_model(api)
    api.inject(Fault(status=status, method="POST", path_prefix="/v1/models/ostris", after_work=True))
    api.inject(Fault(status=500, method="GET", path_prefix="/v1/trainings"))  # the look-up meets a 500 too
    provider = training_provider()
    outs = provider.create(checked(provider, training_props("https://example.com/data.zip"))).outs
    assert list(api.trainings) == [outs["trainingId"]]
    posts = [r for r in api.requests if r[0] == "POST" and r[1].endswith("/trainings")]
    assert len(posts) == 1


def test_the_next_up_adopts_the_training_a_lost_answer_left_running(api):
    create_model(api)
    api.inject(Fault(status=0, count=2, method="POST", path_prefix="/v1/models/ostris", after_work=True))
    impatient = hosted(TrainingProvider(poll_seconds=0.01, retries=0, **FAST))  # gives up at the first lost answer
    props = training_props("https://example.com/data.zip")
    with pytest.raises(httpx.TransportError):  # the lost answer, not retried
        impatient.create(checked(impatient, props))
    (left_running,) = api.trainings  # billing, and in no state
    provider = training_provider()
    outs = provider.create(checked(provider, props)).outs  # the next `pulumi up`
    assert list(api.trainings) == [left_running] == [outs["trainingId"]]


def test_a_new_training_is_started_when_the_same_one_already_ended(api):
    create_model(api)
    provider = training_provider()
    props = checked(provider, training_props("https://example.com/data.zip"))
    first = provider.create(props).outs["trainingId"]
    advance(api, 200)  # it succeeded: a create with the same input (after a destroy) trains again
    second = provider.create(props).outs["trainingId"]
    assert second != first and len(api.trainings) == 2


@pytest.mark.parametrize("status", LOST_ANSWERS.values(), ids=LOST_ANSWERS.keys())
def test_lost_answers_to_model_deployment_and_file_creates_make_one_of_each(api, tmp_path, status):
    api.inject(Fault(status=status, method="POST", path_prefix="/v1/models", after_work=True))
    create_model(api)
    assert list(api.models) == [TRAINER, "alice/lora"]

    api.inject(Fault(status=status, method="POST", path_prefix="/v1/files", after_work=True))
    provider = training_provider()
    provider.create(checked(provider, training_props(str(dataset(tmp_path / "data")))))
    assert len(api.files) == 1

    advance(api, 200)
    version = api.models["alice/lora"].versions[0]["id"]
    api.inject(Fault(status=status, method="POST", path_prefix="/v1/deployments", after_work=True))
    hosted(DeploymentProvider(**FAST)).create(deployment_props(version))
    assert list(api.deployments) == ["alice/lora"]
    assert [r for r in api.requests if r == ("POST", "/v1/deployments")] == [("POST", "/v1/deployments")]


# ---------------------------------------------------------------------------------------- deployment


def trained_version(api: ReplicateApi) -> str:
    create_model(api)
    provider = training_provider()
    provider.create(checked(provider, training_props("https://example.com/data.zip")))
    advance(api, 200)
    return api.models["alice/lora"].versions[0]["id"]


def deployment_props(version: str, **overrides) -> dict:
    return {"name": "lora", "model": "alice/lora", "version": version, "hardware": "gpu-l40s",
            "minInstances": 0, "maxInstances": 1, **overrides}


def test_deployment_create_update_in_place_and_delete_after_offline(api):
    version = trained_version(api)
    provider = hosted(DeploymentProvider(**FAST))
    props = deployment_props(version)
    assert not provider.check({}, props).failures
    created = provider.create(props)
    assert created.id == "alice/lora"
    assert created.outs["release"] == 1 and created.outs["minInstances"] == 0

    bigger = deployment_props(version, hardware="gpu-a100-large", minInstances=1, maxInstances=3)
    diff = provider.diff(created.id, created.outs, bigger)
    assert diff.changes and diff.replaces == []
    updated = provider.update(created.id, created.outs, bigger).outs
    live = api.deployments["alice/lora"]
    assert (live.hardware, live.min_instances, live.max_instances, updated["release"]) == ("gpu-a100-large", 1, 3, 2)

    with pytest.raises(RuntimeError) as error:
        provider.delete(created.id, updated)
    assert "offline and unused for 15 minutes" in str(error.value) and "scaled to 0 instances just now" in str(error.value)
    assert live.min_instances == 0  # scaled to zero on the way
    advance(api, 15 * 60 + 1)
    provider.delete(created.id, updated)
    assert "alice/lora" not in api.deployments
    assert provider.read(created.id, updated).id == ""


def test_deployment_check_refuses_what_the_api_would(api):
    provider = DeploymentProvider()
    for bad, key in (({"version": "latest"}, "version"), ({"hardware": "gpu-z9000"}, "hardware"),
                     ({"minInstances": 3, "maxInstances": 2}, "minInstances"), ({"maxInstances": 0}, "maxInstances")):
        failures = provider.check({}, {**deployment_props("a" * 64), **bad}).failures
        assert [f.property for f in failures] == [key], bad


def test_deployment_create_adopts_one_an_earlier_try_made(api):
    version = trained_version(api)
    provider = hosted(DeploymentProvider(**FAST))
    provider.create(deployment_props(version))
    again = provider.create(deployment_props(version, maxInstances=2))
    assert again.id == "alice/lora" and api.deployments["alice/lora"].max_instances == 2


# -------------------------------------------------------------------------------------------- token


def test_token_never_in_the_pickled_provider_or_outputs(api, monkeypatch):
    provider = hosted(ModelProvider(**FAST))
    assert provider.client().sdk._api_token == TOKEN  # configured from the stack config
    pickled = base64.b64decode(serialize_provider(provider))
    assert TOKEN.encode() not in pickled
    outs = provider.create(model_props()).outs
    assert TOKEN not in repr(outs) and TOKEN not in repr(provider.client())

    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)  # the environment stands in for the config
    assert hosted(ModelProvider(**FAST), token=None).read("alice/lora", outs).id == "alice/lora"
    monkeypatch.delenv("REPLICATE_API_TOKEN")
    with pytest.raises(ValueError, match="replicateApiToken"):
        hosted(ModelProvider(**FAST), token=None).client()
    with pytest.raises(ReplicateError) as error:
        hosted(ModelProvider(**FAST), token="r8_wrong").read("alice/lora", outs)
    assert error.value.status == 401 and "r8_wrong" not in str(error.value)


# ------------------------------------------------------------------ numbers as the Pulumi engine hands them over


def as_engine_sends(props: dict) -> dict:
    """Pulumi passes a provider its inputs through protobuf Structs: every number arrives as a float (1 -> 1.0)."""
    def floats(value):
        if isinstance(value, dict):
            return {key: floats(item) for key, item in value.items()}
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    return floats(props)


def test_deployment_takes_whole_numbers_as_floats_and_sends_integers(api):
    version = trained_version(api)
    provider = hosted(DeploymentProvider(**FAST))
    props = as_engine_sends(deployment_props(version, maxInstances=2))
    assert not provider.check({}, props).failures
    created = provider.create(props)
    live = api.deployments["alice/lora"]
    assert (live.min_instances, live.max_instances) == (0, 2)
    news = as_engine_sends(deployment_props(version, minInstances=1, maxInstances=3))
    updated = provider.update(created.id, created.outs, news)
    assert (live.min_instances, live.max_instances, updated.outs["release"]) == (1, 3, 2)


def test_training_sends_integer_trainer_inputs_when_the_engine_hands_floats(api):
    create_model(api)
    provider = training_provider()
    created = provider.create(as_engine_sends(checked(provider, training_props("https://example.com/data.zip"))))
    sent = api.trainings[created.id].input
    assert (sent["steps"], sent["lora_rank"], sent["batch_size"]) == (100, 16, 1)
    assert all(type(sent[key]) is int for key in ("steps", "lora_rank", "batch_size"))
