"""The policy pack, called the way the Pulumi policy SDK calls it: inputs in the engine's wire format, turned
into the SDK's proxies by the SDK's own deserializer (validate: secrets unwrapped; remediate: secrets marked).
Good inputs are what the components declare for each stack file; bad ones are variants of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pulumi_policy import EnforcementLevel, PolicyCustomTimeouts, PolicyResourceOptions, ResourceValidationArgs, Secret
from pulumi_policy.deserialize import SPECIAL_SECRET_SIG, SPECIAL_SIG_KEY, deserialize_properties
from pulumi_policy.proxy import unknown_checking_proxy

from contract.naming import pod_name
from infra.paths import STACKS_DIR
from infra.runpod_backend import policies as runpod_policies
from infra.runpod_backend.component import pod_env
from infra.stack_files import load_stack
from policy import lorastack_policies as policies

POD_TYPE = "pulumi-python:dynamic/runpod:Pod"
VOLUME_TYPE = "pulumi-python:dynamic/runpod:NetworkVolume"
GENERIC_DYNAMIC_TYPE = "pulumi-python:dynamic:Resource"
STACKS = sorted(path.name.removeprefix("Pulumi.").removesuffix(".yaml") for path in STACKS_DIR.glob("Pulumi.*.yaml"))
RUNPOD_STACKS = [stack for stack in STACKS if load_stack(stack).provider == "runpod"]
POLICY = {policy.name: policy for policy in policies.POLICIES}


def _wire(value: Any) -> Any:
    """Python inputs -> the engine's wire format, secrets as signature objects."""
    if isinstance(value, Secret):
        return {SPECIAL_SIG_KEY: SPECIAL_SECRET_SIG, "value": _wire(value.value)}
    if isinstance(value, dict):
        return {key: _wire(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_wire(item) for item in value]
    return value


def _args(resource_type: str, props: dict, config: dict | None = None, for_remediation: bool = False) -> ResourceValidationArgs:
    deserialized = deserialize_properties(_wire(props), for_remediation)
    options = PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), [])
    name = str(props.get("name", "r"))
    urn = f"urn:pulumi:s::lorastack::{resource_type}::{name}"
    return ResourceValidationArgs(resource_type, unknown_checking_proxy(deserialized), urn, name, options, None, config)


def violations(policy_name: str, resource_type: str, props: dict, config: dict | None = None) -> list[str]:
    found: list[str] = []
    POLICY[policy_name].validate(_args(resource_type, props, config), lambda message, urn=None: found.append(message))
    return found


def all_violations(resource_type: str, props: dict) -> list[str]:
    return [message for name, policy in POLICY.items() if policy.has_validation()
            for message in violations(name, resource_type, props)]


def pod_props(stack: str, **changes: Any) -> dict:
    """The inputs infra/runpod_backend/component.py gives the Pod of `stack` (PodArgs -> Pod props)."""
    config = load_stack(stack)
    runpod = config.runpod
    props = {
        "name": pod_name(stack), "image": config.image.ref, "gpuTypeId": runpod.gpu_type, "gpuCount": runpod.gpu_count,
        "cloud": runpod.cloud, "dataCenterIds": [runpod.data_center], "containerDiskGb": runpod.container_disk_gb,
        "env": pod_env(stack, config, {}), "networkVolumeId": "vol123", "volumeMountPath": "/workspace",
        "podId": None, "status": None, "__provider": "gASVpickled-provider",
    }
    return {**props, **changes}


def volume_props(stack: str, **changes: Any) -> dict:
    config = load_stack(stack)
    props = {"name": pod_name(stack), "sizeGb": config.runpod.volume.size_gb, "dataCenter": config.runpod.data_center,
             "keepOnDestroy": config.runpod.volume.keep_on_destroy, "volumeId": None, "size": None, "type": None}
    return {**props, **changes}


def with_limits(stack: str, **limits: Any) -> dict:
    props = pod_props(stack)
    current = json.loads(props["env"]["LORASTACK_LIMITS"])
    props["env"] = {**props["env"], "LORASTACK_LIMITS": json.dumps({**current, **limits})}
    return props


# --- what the stack files declare passes ------------------------------------------------------------------------


@pytest.mark.parametrize("stack", RUNPOD_STACKS)
def test_the_resources_of_every_stack_file_pass(stack):
    assert all_violations(POD_TYPE, pod_props(stack)) == []
    assert all_violations(VOLUME_TYPE, volume_props(stack)) == []


def test_resources_are_recognised_by_their_inputs_whatever_their_dynamic_type():
    bad_pod = pod_props("sdxl-4090", image="ghcr.io/lorastack/trainer:latest")
    assert violations("pinned-images", GENERIC_DYNAMIC_TYPE, bad_pod)
    assert violations("pinned-images", "aws:s3/bucket:Bucket", bad_pod) == []  # not ours to judge


# --- time and money limits ----------------------------------------------------------------------------------------


def test_a_pod_without_limits_is_refused():
    props = pod_props("sdxl-4090")
    del props["env"]["LORASTACK_LIMITS"]
    assert any("no LORASTACK_LIMITS" in message for message in violations("pod-time-and-money-limits", POD_TYPE, props))


def test_a_pod_above_its_stacks_budget_is_refused():
    found = violations("pod-time-and-money-limits", POD_TYPE, with_limits("sdxl-4090", maxCostUsd=50))
    assert found and "lorastack:limits.maxCostUsd = 3" in found[0]


def test_a_pod_without_a_price_can_never_reach_its_money_limit():
    found = violations("pod-time-and-money-limits", POD_TYPE, with_limits("sdxl-4090", usdPerHour=0))
    assert any("usdPerHour is 0" in message for message in found)


def test_the_policy_config_sets_a_ceiling_for_every_pod():
    props = pod_props("flux-h100")  # maxHours 2
    assert violations("pod-time-and-money-limits", POD_TYPE, props, {"maxHoursPerPod": 1})
    assert violations("pod-time-and-money-limits", POD_TYPE, props, {"maxHoursPerPod": 2}) == []


def test_a_pod_the_reaper_cannot_recognise_is_refused():
    props = pod_props("sdxl-4090", name="my-pod")
    del props["env"]["LORASTACK_MANAGED"]
    assert any("reaper" in message for message in violations("pod-time-and-money-limits", POD_TYPE, props))


# --- pinned images ----------------------------------------------------------------------------------------------

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("image, reason", [
    ("ghcr.io/lorastack/trainer:latest", "'latest'"),
    ("ghcr.io/lorastack/trainer", "no tag"),
    ("localhost:5000/trainer", "no tag"),  # a registry port is not a tag
    (f"ghcr.io/lorastack/trainer:latest@{DIGEST}", "'latest'"),
])
def test_unpinned_images_are_refused(image, reason):
    found = violations("pinned-images", POD_TYPE, pod_props("sdxl-4090", image=image))
    assert len(found) == 1 and reason in found[0]


@pytest.mark.parametrize("image", ["ghcr.io/lorastack/trainer:0.1.0", f"ghcr.io/lorastack/trainer:0.1.0@{DIGEST}",
                                   f"ghcr.io/lorastack/trainer@{DIGEST}", "localhost:5000/trainer:1.2.3"])
def test_pinned_images_pass(image):
    assert violations("pinned-images", POD_TYPE, pod_props("sdxl-4090", image=image)) == []


# --- Replicate ----------------------------------------------------------------------------------------------------

# the inputs infra/replicate_backend/model.py and deployment.py declare
MODEL_TYPE, DEPLOYMENT_TYPE = "pulumi-python:dynamic/replicate:Model", "pulumi-python:dynamic/replicate:Deployment"
MODEL = {"owner": "acme", "name": "flux-style", "visibility": "private", "hardware": "gpu-h100", "description": "x",
         "keepOnDestroy": True, "modelId": None, "url": None, "latestVersion": None}
DEPLOYMENT = {"name": "flux-style", "model": "acme/flux-style", "version": "a" * 64, "hardware": "gpu-l40s",
              "minInstances": 0, "maxInstances": 1, "deploymentId": None, "owner": None, "release": None, "url": None}


def test_a_public_replicate_model_needs_the_explicit_flag():
    public = {**MODEL, "visibility": "public"}
    assert violations("private-replicate-models", MODEL_TYPE, MODEL) == []
    assert violations("private-replicate-models", MODEL_TYPE, public)
    assert violations("private-replicate-models", GENERIC_DYNAMIC_TYPE, public)
    assert violations("private-replicate-models", MODEL_TYPE, public, {"allowPublicModels": True}) == []
    assert all_violations(MODEL_TYPE, MODEL) == []  # a model is no volume, though it has keepOnDestroy


@pytest.mark.parametrize("spelling", ["minInstances", "min_instances"])
def test_a_warm_deployment_needs_the_explicit_flag(spelling):
    warm = {key: value for key, value in DEPLOYMENT.items() if key != "minInstances"} | {spelling: 2}
    if spelling == "min_instances":
        warm["max_instances"] = warm.pop("maxInstances")
    assert violations("deployments-scale-to-zero", DEPLOYMENT_TYPE, DEPLOYMENT) == []
    found = violations("deployments-scale-to-zero", DEPLOYMENT_TYPE, warm)
    assert found and "2 instance(s)" in found[0]
    assert violations("deployments-scale-to-zero", DEPLOYMENT_TYPE, warm, {"allowWarmDeployments": True}) == []


# --- volumes ------------------------------------------------------------------------------------------------------


def test_a_volume_deleted_on_destroy_needs_the_stack_file_to_say_so(tmp_path):
    assert violations("volumes-kept-on-destroy", VOLUME_TYPE, volume_props("sdxl-4090", keepOnDestroy=False))
    assert violations("volumes-kept-on-destroy", VOLUME_TYPE, volume_props("sdxl-4090", keepOnDestroy=False),
                      {"allowVolumeDeletion": True}) == []
    # a stack file that says keepOnDestroy: false in as many words
    document = yaml.safe_load((STACKS_DIR / "Pulumi.sdxl-4090.yaml").read_text())
    document["config"]["lorastack:runpod"]["volume"]["keepOnDestroy"] = False
    (tmp_path / "Pulumi.sdxl-4090.yaml").write_text(yaml.safe_dump(document))
    found: list[str] = []
    runpod_policies.validate_volumes_kept(_args(VOLUME_TYPE, volume_props("sdxl-4090", keepOnDestroy=False)),
                                   lambda message, urn=None: found.append(message), tmp_path)
    assert found == []


# --- secrets --------------------------------------------------------------------------------------------------


def remediate(resource_type: str, props: dict) -> dict | None:
    return POLICY["secrets-never-plain"].remediate(_args(resource_type, props, for_remediation=True))


def test_the_secrets_policy_remediates_and_never_reports_on_unwrapped_values():
    policy = POLICY["secrets-never-plain"]
    assert policy.enforcement_level == EnforcementLevel.REMEDIATE and not policy.has_validation()


def test_a_plain_token_in_a_pods_env_is_made_secret():
    props = pod_props("flux-h100")
    props["env"] = {**props["env"], "HF_TOKEN": "hf_plain_value"}
    fixed = remediate(POD_TYPE, props)
    assert isinstance(fixed["env"]["HF_TOKEN"], Secret) and fixed["env"]["HF_TOKEN"].value == "hf_plain_value"
    assert fixed["env"]["LORASTACK_STACK"] == "flux-h100" and fixed["image"] == props["image"]  # the rest unchanged
    assert _wire(fixed)["env"]["HF_TOKEN"][SPECIAL_SIG_KEY] == SPECIAL_SECRET_SIG


def test_an_env_that_is_secret_as_a_whole_is_left_alone():
    props = pod_props("flux-h100")
    props["env"] = Secret({**props["env"], "HF_TOKEN": "hf_value", "WANDB_API_KEY": "wandb_value"})
    assert remediate(POD_TYPE, props) is None


def test_plain_token_inputs_of_a_replicate_training_are_made_secret():
    # the inputs infra/replicate_backend/training.py declares, with the tokens given as plain strings by mistake
    training = {"destination": "acme/flux-style", "trainer": "ostris/flux-dev-lora-trainer", "trainerVersion": None,
                "trainerInput": {"steps": 1000, "lora_rank": 16, "hf_repo_id": "acme/lora"},
                "datasetSource": "https://example.com/d.zip", "hfToken": "hf_plain", "wandbApiKey": Secret("wb_secret"),
                "wait": False, "maxSeconds": 7200, "maxCostUsd": 10, "usdPerSecond": 0.001525}
    fixed = remediate("pulumi-python:dynamic/replicate:Training", training)
    assert isinstance(fixed["hfToken"], Secret) and fixed["hfToken"].value == "hf_plain"
    assert fixed["wandbApiKey"].value == "wb_secret" and fixed["trainerInput"]["steps"] == 1000
    assert policies.plain_secret_paths(fixed) == []


def test_nested_token_inputs_are_found_too():
    fixed = remediate(GENERIC_DYNAMIC_TYPE, {"input": {"steps": 5, "hf_token": "hf_plain", "wandb_api_key": "wb"}})
    assert isinstance(fixed["input"]["hf_token"], Secret) and isinstance(fixed["input"]["wandb_api_key"], Secret)
    assert fixed["input"]["steps"] == 5


def test_the_pack_declares_a_python_runtime_on_the_projects_venv():
    pack = yaml.safe_load((Path(policies.__file__).parent / "PulumiPolicy.yaml").read_text())
    assert pack["runtime"]["name"] == "python" and pack["runtime"]["options"]["virtualenv"] == "../.venv"
    assert len(POLICY) == len(policies.POLICIES)  # names are unique


def test_a_warm_deployment_is_caught_with_the_engines_float_numbers():
    # the analyzer gets inputs through a protobuf Struct: minInstances 2 arrives as 2.0
    warm = {**DEPLOYMENT, "minInstances": 2.0, "maxInstances": 3.0}
    found = violations("deployments-scale-to-zero", DEPLOYMENT_TYPE, warm)
    assert found and "2 instance(s)" in found[0]
    assert violations("deployments-scale-to-zero", DEPLOYMENT_TYPE, {**DEPLOYMENT, "minInstances": 0.0}) == []


def vast_instance_props(**changes: Any) -> dict:
    """The inputs infra/vast_backend/component.py gives the Instance of the example Vast.ai stack (env: its plain part)."""
    stack = "sdxl-vast-4090"
    config = load_stack(stack)
    vast = config.vast
    env = {"LORASTACK_LIMITS": config.run_limits().model_dump_json(by_alias=True), "LORASTACK_MANAGED": "1"}
    props = {"label": pod_name(stack), "image": config.image.ref, "gpuName": vast.gpu_name, "gpuCount": vast.gpu_count,
             "minReliability": vast.min_reliability, "maxUsdPerHour": vast.max_usd_per_hour, "diskGb": vast.disk_gb,
             "verified": vast.verified, "env": env, "instanceId": None, "__provider": "gASVpickled-provider"}
    return {**props, **changes}


def test_a_vast_instance_needs_limits_within_budget_the_reapers_marks_and_a_pinned_image():
    policy, kind = "vast-instance-limits-and-image", "pulumi-python:dynamic/vast:Instance"
    assert all_violations(kind, vast_instance_props()) == []
    assert "latest" in " ".join(violations(policy, kind, vast_instance_props(image="ghcr.io/lorastack/trainer:latest")))
    unmarked = vast_instance_props(label="my-box")
    assert "reaper's marks" in " ".join(violations(policy, kind, unmarked))
    limits = json.loads(vast_instance_props()["env"]["LORASTACK_LIMITS"])
    over = vast_instance_props(env={"LORASTACK_MANAGED": "1",
                                    "LORASTACK_LIMITS": json.dumps({**limits, "maxCostUsd": 50})})
    assert "above the stack's budget" in " ".join(violations(policy, kind, over))
