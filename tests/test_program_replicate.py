"""The program over stacks/Pulumi.flux-replicate.yaml, run as Pulumi's language host runs it.

The engine (emulator/language_host.py) records what the program asks for (type, inputs, retainOnDelete,
additionalSecretOutputs) and answers with made-up resources (`Mocks`), so the assertions are about what
`pulumi up --stack flux-replicate` would do.
"""

from __future__ import annotations

import base64
import copy
import json

import dill
import pulumi
import pytest
import yaml
from pulumi.runtime import rpc

from emulator.language_host import ProgramError, ProgramRun
from infra.replicate_backend.component import PROJECT_ROOT
from infra.replicate_backend.training import TrainingProvider
from infra.stack_files import STACKS_DIR, parse_stack
from tests.pulumi_mocks import run_mocked

STACK = "flux-replicate"
TOKEN = "r8_program_test_token_facade"
HF_TOKEN = "hf_program_test_token_c0ffee"
WANDB_KEY = "wandb_program_test_key_beef"
MODEL_TYPE = "pulumi-python:dynamic/replicate:Model"
TRAINING_TYPE = "pulumi-python:dynamic/replicate:Training"
DEPLOYMENT_TYPE = "pulumi-python:dynamic/replicate:Deployment"
TRAINED_VERSION = "f" * 64
RAW = (yaml.safe_load((STACKS_DIR / f"Pulumi.{STACK}.yaml").read_text()) or {})["config"]


class Mocks(pulumi.runtime.Mocks):
    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        state = dict(args.inputs)
        if args.typ == MODEL_TYPE:
            model_id = f"{args.inputs['owner']}/{args.inputs['name']}"
            state.update(modelId=model_id, url=f"https://replicate.com/{model_id}", latestVersion=None)
            return model_id, state
        if args.typ == TRAINING_TYPE:
            state.update(trainingId="t1abc", status="succeeded", version=TRAINED_VERSION,
                         versionRef=f"{args.inputs['destination']}:{TRAINED_VERSION}",
                         weights="https://replicate.delivery/t1abc/trained_model.tar",
                         trainingUrl="https://replicate.com/p/t1abc")
            return "t1abc", state
        if args.typ == DEPLOYMENT_TYPE:
            deployment_id = f"{args.inputs['model'].split('/')[0]}/{args.inputs['name']}"
            state.update(deploymentId=deployment_id, release=1, url=f"https://replicate.com/deployments/{deployment_id}")
            return deployment_id, state
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict:
        return {}


def run(raw: dict, secrets: dict[str, str]) -> tuple[ProgramRun, dict]:
    """Run the program with `raw` as the stack file's config and `secrets` set as config secrets."""
    program = run_mocked(Mocks(), STACK, raw, secrets)
    return program, program.outputs


def with_changes(**sections) -> dict:
    raw = copy.deepcopy(RAW)
    for key, changes in sections.items():
        raw[f"lorastack:{key}"].update(changes)
    return raw


def test_the_example_stack_declares_model_training_and_a_scale_to_zero_deployment():
    config = parse_stack(RAW, STACK)
    replicate, spec = config.replicate, config.train
    program, outputs = run(RAW, {"replicateApiToken": TOKEN})

    model = program.one(MODEL_TYPE)
    assert model.inputs["owner"] == replicate.owner and model.inputs["name"] == replicate.model
    assert model.inputs["visibility"] == "private" and model.inputs["hardware"] == replicate.hardware
    assert model.retain_on_delete is True and model.inputs["keepOnDestroy"] is True

    training = program.one(TRAINING_TYPE).inputs
    assert training["destination"] == f"{replicate.owner}/{replicate.model}"
    assert training["trainer"] == "ostris/flux-dev-lora-trainer" and training.get("trainerVersion") is None
    assert training["trainerInput"] == {
        "steps": spec.steps, "lora_rank": spec.rank, "learning_rate": spec.learning_rate,
        "batch_size": spec.batch_size, "resolution": str(spec.resolution), "autocaption": False,
        "trigger_word": spec.trigger_word,
    }
    assert training["datasetSource"] == spec.dataset.source  # an https .zip: passed as it is
    assert training["wait"] is True  # a deployment needs the trained version
    assert training["maxSeconds"] == config.limits.max_hours * 3600
    assert training["maxCostUsd"] == config.limits.max_cost_usd
    assert training.get("hfToken") is None and training.get("wandbApiKey") is None

    deployment = program.one(DEPLOYMENT_TYPE).inputs
    assert deployment["minInstances"] == 0 and deployment["maxInstances"] == 1
    assert deployment["version"] == TRAINED_VERSION and deployment["hardware"] == "gpu-l40s"
    assert deployment["model"] == f"{replicate.owner}/{replicate.model}"

    assert outputs["modelUrl"] == f"https://replicate.com/{replicate.owner}/{replicate.model}"
    assert outputs["version"] == f"{replicate.owner}/{replicate.model}:{TRAINED_VERSION}"
    assert outputs["trainingId"] == "t1abc" and outputs["status"] == "succeeded"
    assert outputs["weights"].endswith("trained_model.tar")
    assert outputs["usdPerSecond"] == 0.001525
    estimate = config.cost_estimate().as_outputs()
    assert outputs["estimatedCostUsd"] == estimate["estimatedCostUsd"] > 0
    assert outputs["estimatedHours"] == estimate["estimatedHours"] > 0
    assert outputs["deploymentUrl"].endswith(f"/deployments/{replicate.owner}/{replicate.model}")


def test_tokens_are_secret_inputs_and_never_in_outputs_or_the_pickled_provider():
    raw = with_changes(train={"hfRepo": "alice/flux-lora", "wandbProject": "loras"})
    program, outputs = run(raw, {"replicateApiToken": TOKEN, "hfToken": HF_TOKEN, "wandbApiKey": WANDB_KEY})
    entry = program.one(TRAINING_TYPE)
    inputs = entry.inputs
    assert rpc.is_rpc_secret(inputs["hfToken"]) and rpc.unwrap_rpc_secret(inputs["hfToken"]) == HF_TOKEN
    assert rpc.is_rpc_secret(inputs["wandbApiKey"]) and rpc.unwrap_rpc_secret(inputs["wandbApiKey"]) == WANDB_KEY
    assert {"hfToken", "wandbApiKey"} <= set(entry.additional_secret_outputs)
    assert inputs["trainerInput"]["hf_repo_id"] == "alice/flux-lora" and inputs["trainerInput"]["wandb_project"] == "loras"
    assert not {"hf_token", "wandb_api_key"} & set(inputs["trainerInput"])

    for registered in program.registrations.values():
        if "__provider" in registered.inputs:
            assert rpc.is_rpc_secret(registered.inputs["__provider"])
            pickled = base64.b64decode(rpc.unwrap_rpc_secret(registered.inputs["__provider"]))
            assert TOKEN.encode() not in pickled
    pickled_training = base64.b64decode(rpc.unwrap_rpc_secret(inputs["__provider"]))
    assert isinstance(dill.loads(pickled_training), TrainingProvider)
    dumped = json.dumps(outputs)
    assert TOKEN not in dumped and HF_TOKEN not in dumped and WANDB_KEY not in dumped


def test_without_a_deployment_and_wait_nothing_is_deployed_and_up_does_not_wait():
    raw = with_changes(replicate={"deployment": None, "wait": False})
    program, outputs = run(raw, {"replicateApiToken": TOKEN})
    assert program.of_type(DEPLOYMENT_TYPE) == [] and outputs.get("deploymentUrl") is None
    assert program.one(TRAINING_TYPE).inputs["wait"] is False


def test_a_model_not_kept_is_deleted_on_destroy_and_a_pinned_trainer_is_passed():
    raw = with_changes(replicate={"keepModelOnDestroy": False, "trainerVersion": "a" * 64})
    program, _ = run(raw, {"replicateApiToken": TOKEN})
    model = program.one(MODEL_TYPE)
    assert model.retain_on_delete is False and model.inputs["keepOnDestroy"] is False
    assert program.one(TRAINING_TYPE).inputs["trainerVersion"] == "a" * 64


def test_a_local_dataset_folder_is_resolved_from_the_project_root():
    raw = with_changes(train={"dataset": {"source": "datasets/my-subject"}})
    program, _ = run(raw, {"replicateApiToken": TOKEN})
    assert program.one(TRAINING_TYPE).inputs["datasetSource"] == str(PROJECT_ROOT / "datasets/my-subject")


@pytest.mark.parametrize(("changes", "secrets", "message"), [
    ({}, {}, "replicateApiToken"),
    ({"hfRepo": "alice/flux-lora"}, {"replicateApiToken": TOKEN}, "hfToken"),
    ({"wandbProject": "loras"}, {"replicateApiToken": TOKEN}, "wandbApiKey"),
])
def test_missing_secrets_fail_early_with_the_command(monkeypatch, changes, secrets, message):
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    with pytest.raises(ProgramError, match=message):
        run(with_changes(train=changes), secrets)


class PreviewOfAModelUpdate(Mocks):
    """What the engine reports for a Model being updated (its description changed) during a preview: the id
    is kept, the dynamic provider's outputs (modelId, url) are not known yet."""

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        if rpc.UNKNOWN in args.inputs.values():
            return f"{args.name}-id", dict(args.inputs)  # an input not known in this preview
        id_, state = super().new_resource(args)
        if args.typ == MODEL_TYPE:
            state = {key: value for key, value in state.items() if key not in ("modelId", "url", "latestVersion")}
        return id_, state


def test_a_model_update_does_not_preview_as_retraining():
    # the training's destination and the deployment's model come from the model's id, known in the preview of an
    # update; its modelId output is not, and an unknown destination would preview as a replaced (re-billed) training
    config = parse_stack(RAW, f"Pulumi.{STACK}.yaml")
    program = run_mocked(PreviewOfAModelUpdate(), STACK, RAW, {"replicateApiToken": TOKEN}, preview=True)
    model = f"{config.replicate.owner}/{config.replicate.model}"
    assert program.one(TRAINING_TYPE).inputs["destination"] == model
    assert program.one(DEPLOYMENT_TYPE).inputs["model"] == model
