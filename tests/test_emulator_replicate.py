"""emulator/replicate.py through the real `replicate` client (and raw HTTP where the client hides the answer)."""

from __future__ import annotations

import io

import httpx
import pytest
import replicate
from pydantic.v1 import ValidationError as ClientModelError
from replicate.exceptions import ReplicateError

from emulator.replicate import DEFAULT_TOKEN, TRAINER, TRAINER_VERSION, FakeClock, ReplicateApi
from emulator.server import Fault, serve
from infra.replicate_backend import catalog

START, RUN = 10.0, 100.0


@pytest.fixture(scope="module")
def server():
    api = ReplicateApi(start_seconds=START, run_seconds=RUN)
    with serve(api) as base_url:
        yield api, base_url


@pytest.fixture
def emulator(server):
    api, base_url = server
    api.reset()
    api.clock = clock = FakeClock()
    return api, clock, base_url


@pytest.fixture
def client(emulator):
    return replicate.Client(api_token=DEFAULT_TOKEN, base_url=emulator[2])


def start_training(client: replicate.Client, destination: str = "alice/lora", **inputs):
    return client.trainings.create(
        model=TRAINER, version=TRAINER_VERSION, destination=destination,
        input={"input_images": "https://example.com/data.zip", "steps": 100, **inputs},
    )


def test_requests_need_a_token_bearer_or_token_scheme(emulator):
    api, _, base_url = emulator
    assert httpx.get(f"{base_url}/v1/hardware").status_code == 401
    assert httpx.get(f"{base_url}/v1/hardware", headers={"Authorization": "Bearer wrong"}).status_code == 401
    for scheme in ("Bearer", "Token"):
        assert httpx.get(f"{base_url}/v1/hardware", headers={"Authorization": f"{scheme} {DEFAULT_TOKEN}"}).status_code == 200
    with pytest.raises(ReplicateError) as error:
        replicate.Client(api_token="r8_wrong", base_url=base_url).models.get(TRAINER)
    assert error.value.status == 401


def test_hardware_lists_every_priced_sku(client):
    skus = {hardware.sku for hardware in client.hardware.list()}
    assert set(catalog.REPLICATE_HARDWARE_USD_PER_SECOND) <= skus


def test_trainer_is_seeded_with_a_version(client):
    trainer = client.models.get(TRAINER)
    assert trainer.visibility == "public"
    assert trainer.latest_version.id == TRAINER_VERSION
    schema = trainer.latest_version.openapi_schema["components"]["schemas"]["TrainingInput"]
    assert {"input_images", "trigger_word", "steps", "lora_rank", "hf_token"} <= set(schema["properties"])


def test_model_create_get_and_duplicate(client):
    created = client.models.create("alice", "lora", visibility="private", hardware="gpu-h100", description="mine")
    assert created.url == "https://replicate.com/alice/lora"
    assert client.models.get("alice/lora").description == "mine"
    with pytest.raises(ReplicateError) as error:
        client.models.create("alice", "lora", visibility="private", hardware="gpu-h100")
    assert error.value.status == 409
    with pytest.raises(ReplicateError) as error:
        client.models.create("alice", "other", visibility="private", hardware="gpu-z9000")
    assert error.value.status == 422


def test_model_delete_only_private_and_without_versions(emulator, client):
    _, clock, _ = emulator
    client.models.create("alice", "public-one", visibility="public", hardware="gpu-t4")
    with pytest.raises(ReplicateError, match="private"):
        client.models.delete("alice/public-one")

    client.models.create("alice", "lora", visibility="private", hardware="gpu-h100")
    start_training(client)
    clock.advance(START + RUN)
    versions = client.models.get("alice/lora").versions.list().results
    assert len(versions) == 1
    with pytest.raises(ReplicateError, match="versions"):
        client.models.delete("alice/lora")
    assert client.models.get("alice/lora").versions.delete(versions[0].id) is False  # the client's 202 quirk
    assert client.models.delete("alice/lora") is True
    with pytest.raises(ReplicateError) as error:
        client.models.get("alice/lora")
    assert error.value.status == 404


def test_training_progresses_on_the_clock_and_publishes_a_version(emulator, client):
    _, clock, _ = emulator
    client.models.create("alice", "lora", visibility="private", hardware="gpu-h100")
    training = start_training(client, trigger_word="TOK")
    assert training.status == "starting"
    clock.advance(START + RUN / 2)
    halfway = client.trainings.get(training.id)
    assert halfway.status == "processing"
    assert "step 50/100" in halfway.logs
    clock.advance(RUN)
    done = client.trainings.get(training.id)
    assert done.status == "succeeded"
    new_version = done.output["version"].split(":")[1]
    assert done.output["version"] == f"alice/lora:{new_version}"
    assert done.output["weights"].endswith("trained_model.tar")
    assert client.models.get("alice/lora").latest_version.id == new_version
    raw = httpx.get(f"{emulator[2]}/v1/trainings/{training.id}", headers={"Authorization": f"Bearer {DEFAULT_TOKEN}"}).json()
    assert raw["metrics"]["predict_time"] == pytest.approx(RUN)
    assert [t.id for t in client.trainings.list().results] == [training.id]


@pytest.mark.parametrize("outcome", ["failed", "canceled"])
def test_training_ends_as_planned(emulator, client, outcome):
    api, clock, _ = emulator
    client.models.create("alice", "lora", visibility="private", hardware="gpu-h100")
    api.plan_outcome(outcome)
    training = start_training(client)
    clock.advance(START + RUN)
    ended = client.trainings.get(training.id)
    assert ended.status == outcome
    assert ended.output is None
    assert (ended.error is not None) == (outcome == "failed")
    assert client.models.get("alice/lora").latest_version is None


def test_aborted_training_is_valid_api_json_the_client_cannot_read(emulator, client):
    api, clock, base_url = emulator
    client.models.create("alice", "lora", visibility="private", hardware="gpu-h100")
    api.plan_outcome("aborted")
    training = start_training(client)
    clock.advance(START)
    raw = httpx.get(f"{base_url}/v1/trainings/{training.id}", headers={"Authorization": f"Bearer {DEFAULT_TOKEN}"}).json()
    assert raw["status"] == "aborted" and raw["started_at"] is None
    with pytest.raises(ClientModelError):
        client.trainings.get(training.id)


def test_cancel_stops_a_running_training(emulator, client):
    _, clock, _ = emulator
    client.models.create("alice", "lora", visibility="private", hardware="gpu-h100")
    training = start_training(client)
    clock.advance(START + 1)
    assert client.trainings.cancel(training.id).status == "canceled"
    clock.advance(RUN)
    assert client.trainings.get(training.id).status == "canceled"
    assert client.models.get("alice/lora").latest_version is None


def test_training_input_and_destination_are_validated(client):
    with pytest.raises(ReplicateError) as error:
        start_training(client, "alice/missing")
    assert error.value.status == 404
    client.models.create("alice", "lora", visibility="private", hardware="gpu-h100")
    with pytest.raises(ReplicateError) as error:
        start_training(client, rank=16)  # the trainer calls it lora_rank
    assert error.value.status == 422 and "rank" in error.value.detail
    with pytest.raises(ReplicateError) as error:
        start_training(client, steps="many")
    assert error.value.status == 422


def test_deployments_validate_update_and_delete_after_15_minutes_offline(emulator, client):
    _, clock, _ = emulator
    client.models.create("alice", "lora", visibility="private", hardware="gpu-h100")
    start_training(client)
    clock.advance(START + RUN)
    version = client.models.get("alice/lora").latest_version.id
    base = {"name": "lora", "model": "alice/lora", "version": version, "hardware": "gpu-l40s",
            "min_instances": 0, "max_instances": 1}
    for bad in ({"version": "abc"}, {"hardware": "gpu-z9000"}, {"min_instances": 2, "max_instances": 1},
                {"max_instances": 21}):
        with pytest.raises(ReplicateError) as error:
            client.deployments.create(**{**base, **bad})
        assert error.value.status == 422, bad
    with pytest.raises(ReplicateError) as error:
        client.deployments.create(**{k: v for k, v in base.items() if k != "hardware"})
    assert error.value.status == 422

    deployment = client.deployments.create(**base)
    assert deployment.current_release.number == 1
    updated = client.deployments.update(deployment.owner, deployment.name, min_instances=1, max_instances=3)
    assert updated.current_release.number == 2
    assert updated.current_release.configuration.min_instances == 1
    clock.advance(3600)
    with pytest.raises(ReplicateError, match="15 minutes"):  # running instances: not offline
        client.deployments.delete(deployment.owner, deployment.name)
    client.deployments.update(deployment.owner, deployment.name, min_instances=0)
    clock.advance(14 * 60)
    with pytest.raises(ReplicateError, match="15 minutes"):
        client.deployments.delete(deployment.owner, deployment.name)
    with pytest.raises(ReplicateError):  # a deployed version cannot be deleted
        client.models.get("alice/lora").versions.delete(version)
    clock.advance(60)
    assert client.deployments.delete(deployment.owner, deployment.name) is True


def test_files_upload_multipart_and_read_back(emulator, client):
    api, _, _ = emulator
    uploaded = client.files.create(io.BytesIO(b"PK\x03\x04 zip bytes"), filename="data.zip",
                                   content_type="application/zip", metadata={"purpose": "test"})
    assert uploaded.name == "data.zip" and uploaded.content_type == "application/zip"
    assert uploaded.metadata == {"purpose": "test"}
    assert api.file_content(uploaded.id) == b"PK\x03\x04 zip bytes"
    assert client.files.get(uploaded.id).checksums["sha256"] == uploaded.checksums["sha256"]
    assert [f.id for f in client.files.list()] == [uploaded.id]
    assert client.files.delete(uploaded.id) is True


def test_injected_fault_uses_replicate_error_shape(emulator, client):
    api, _, _ = emulator
    api.inject(Fault(status=503, count=1, method="POST", path_prefix="/v1/models"))
    with pytest.raises(ReplicateError) as error:  # the client itself never retries a POST
        client.models.create("alice", "lora", visibility="private", hardware="gpu-h100")
    assert error.value.status == 503 and error.value.title == "Service Unavailable"
