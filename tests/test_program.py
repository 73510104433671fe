"""The Pulumi program, run as Pulumi's language host runs it, for every RunPod stack file in stacks/.

The engine (emulator/language_host.py) records what the program asks for (resource type, inputs, retainOnDelete,
additionalSecretOutputs, deleteBeforeReplace) and answers with made-up resources (`Mocks`), so the assertions are
about what `pulumi up` would do. The stacks run with `wait: false`: there is no pod to follow behind a made-up id.
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

from contract.spec import RunLimits, TrainSpec
from emulator.language_host import ProgramError, ProgramRun
from infra.runpod_backend.pod import PodProvider
from infra.stack_files import STACKS_DIR, parse_stack
from tests.pulumi_mocks import run_mocked

API_KEY = "rpa_program_test_key_feedface"
HF_TOKEN = "hf_program_test_token_c0ffee"
VOLUME_TYPE = "pulumi-python:dynamic/runpod:NetworkVolume"
POD_TYPE = "pulumi-python:dynamic/runpod:Pod"
DIGEST_REF = "ghcr.io/lorastack/trainer:0.1.0@sha256:" + "ab" * 32


def stack_documents() -> dict[str, dict]:
    documents = {}
    for path in sorted(STACKS_DIR.glob("Pulumi.*.yaml")):
        stack = path.name.removeprefix("Pulumi.").removesuffix(".yaml")
        documents[stack] = (yaml.safe_load(path.read_text()) or {}).get("config") or {}
    return documents


RUNPOD_STACKS = {name: config for name, config in stack_documents().items() if config.get("lorastack:provider") == "runpod"}


class Mocks(pulumi.runtime.Mocks):
    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        state, id_ = dict(args.inputs), f"{args.name}-id"
        if args.typ == VOLUME_TYPE:
            id_ = f"vol-{args.name}"
            state.update(volumeId=id_, size=args.inputs["sizeGb"])
        elif args.typ == POD_TYPE:
            id_ = f"pod-{args.name}"
            state.update(podId=id_, status="PROVISIONING", dataCenterId="US-TX-3", costPerHour=0.5)
        elif args.typ == "command:local:Command":
            state.update(stdout=f"pushed\n{DIGEST_REF}\n")
        return id_, state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict:
        return {}


def run(stack: str, config: dict, secrets: dict[str, str] | None = None) -> tuple[ProgramRun, dict]:
    """Run stack `stack`'s program with `config` as its stack file's config and `secrets` set as config secrets."""
    program = run_mocked(Mocks(), stack, {**config, "lorastack:wait": False}, secrets)
    return program, program.outputs


def unwrap(value):
    return rpc.unwrap_rpc_secret(value)


@pytest.fixture(autouse=True)
def no_keys_from_the_environment(monkeypatch):
    for variable in ("RUNPOD_API_KEY", "HF_TOKEN", "WANDB_API_KEY", "REPLICATE_API_TOKEN"):
        monkeypatch.delenv(variable, raising=False)


def test_the_demo_stack_and_the_examples_are_covered():
    assert {"demo", "sdxl-4090", "sd15-3090", "flux-h100"} <= set(RUNPOD_STACKS)


@pytest.mark.parametrize("stack", sorted(RUNPOD_STACKS))
@pytest.mark.parametrize("with_hf_token", [False, True], ids=["no-tokens", "hf-token"])
def test_runpod_stack_declares_volume_and_pod(stack, with_hf_token):
    raw = RUNPOD_STACKS[stack]
    config = parse_stack(raw, stack)
    runpod = config.runpod
    secrets = {"runpodApiKey": API_KEY, **({"hfToken": HF_TOKEN} if with_hf_token else {})}
    program, outputs = run(stack, raw, secrets)

    volumes, (pod,) = program.of_type(VOLUME_TYPE), program.of_type(POD_TYPE)
    inputs = pod.inputs
    if runpod.volume is None:
        assert volumes == [] and inputs["networkVolumeId"] is None
    else:
        (volume,) = volumes
        assert volume.inputs["dataCenter"] == runpod.data_center
        assert volume.inputs["sizeGb"] == runpod.volume.size_gb
        assert volume.inputs["name"] == f"lorastack-{stack}"
        assert volume.retain_on_delete is runpod.volume.keep_on_destroy
        assert inputs["networkVolumeId"] == f"vol-{stack}-volume"
        assert inputs["dataCenterIds"] == [runpod.data_center]
        assert inputs["volumeMountPath"] == "/workspace"
        assert outputs["volumeId"] == f"vol-{stack}-volume" and outputs["dataCenter"] == runpod.data_center

    assert inputs["image"] == config.image.ref
    assert inputs["gpuTypeId"] == runpod.gpu_type and inputs["gpuCount"] == runpod.gpu_count
    assert inputs["cloud"] == "SECURE" and inputs["containerDiskGb"] == runpod.container_disk_gb
    assert inputs["name"] == f"lorastack-{stack}"
    assert pod.delete_before_replace is True and "env" in pod.additional_secret_outputs

    assert rpc.is_rpc_secret(inputs["env"]) is with_hf_token
    env = unwrap(inputs["env"])
    assert TrainSpec.model_validate_json(env["LORASTACK_SPEC"]) == config.train
    assert RunLimits.model_validate_json(env["LORASTACK_LIMITS"]).usd_per_hour == pytest.approx(config.usd_per_hour()[0])
    assert env["LORASTACK_MANAGED"] == "1" and env["LORASTACK_STACK"] == stack
    assert env["LORASTACK_WORKSPACE"] == "/workspace" and env["HF_HOME"] == "/workspace/hf"
    assert env["LORASTACK_RUN_ID"] == outputs["runId"] and outputs["runId"].startswith(f"{stack}-")
    assert (env.get("HF_TOKEN") == HF_TOKEN) is with_hf_token
    assert "RUNPOD_API_KEY" not in env

    # the pickled provider is a secret, unpickles by module reference, and holds no key
    assert rpc.is_rpc_secret(inputs["__provider"])
    pickled = base64.b64decode(unwrap(inputs["__provider"]))
    assert API_KEY.encode() not in pickled and isinstance(dill.loads(pickled), PodProvider)

    assert outputs["podId"] == f"pod-{stack}-pod" and outputs["podId"] in outputs["consoleUrl"]
    assert outputs["logsCommand"] == f"make logs STACK={stack}"
    assert outputs["estimatedCostUsd"] == config.cost_estimate().as_outputs()["estimatedCostUsd"]
    assert outputs["usdPerHour"] > 0 and outputs["gpu"].startswith(runpod.gpu_type)
    assert API_KEY not in json.dumps(outputs) and HF_TOKEN not in json.dumps(outputs)


def test_a_volume_not_kept_is_deleted_on_destroy():
    raw = copy.deepcopy(RUNPOD_STACKS["sdxl-4090"])
    raw["lorastack:runpod"]["volume"]["keepOnDestroy"] = False
    program, _ = run("sdxl-4090", raw, {"runpodApiKey": API_KEY})
    (volume,) = program.of_type(VOLUME_TYPE)
    assert volume.retain_on_delete is False and volume.inputs["keepOnDestroy"] is False


def test_a_stack_without_a_volume_lets_the_scheduler_place_the_pod():
    raw = copy.deepcopy(RUNPOD_STACKS["sdxl-4090"])
    raw["lorastack:runpod"].update(volume=None, checkpointsLostWithContainer=True, dataCenter=None, cloud="COMMUNITY")
    program, outputs = run("sdxl-4090", raw, {"runpodApiKey": API_KEY})
    (pod,) = program.of_type(POD_TYPE)
    # a None export is left out, as the SDK sends it
    assert program.of_type(VOLUME_TYPE) == [] and outputs.get("volumeId") is None
    assert pod.inputs["dataCenterIds"] == [] and pod.inputs["cloud"] == "COMMUNITY"
    assert outputs["dataCenter"] == "US-TX-3"  # where RunPod placed it (the mock)


def test_image_build_uses_the_built_digest():
    raw = copy.deepcopy(RUNPOD_STACKS["demo"])
    raw["lorastack:image"]["build"] = True
    program, _ = run("demo", raw, {"runpodApiKey": API_KEY})
    (pod,) = program.of_type(POD_TYPE)
    assert pod.inputs["image"] == DIGEST_REF


def test_a_bad_value_fails_with_the_stack_file_and_key():
    raw = copy.deepcopy(RUNPOD_STACKS["sdxl-4090"])
    raw["lorastack:train"]["learningRate"] = 0.5
    with pytest.raises(ProgramError) as caught:
        run("sdxl-4090", raw, {"runpodApiKey": API_KEY})
    message = str(caught.value)
    assert "Pulumi.sdxl-4090.yaml" in message and "lorastack:train.learningRate = 0.5" in message


def test_without_an_api_key_the_program_says_how_to_set_one():
    with pytest.raises(ProgramError, match="config set --secret runpodApiKey"):
        run("demo", RUNPOD_STACKS["demo"])


def test_the_key_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    program, _ = run("demo", RUNPOD_STACKS["demo"])
    assert len(program.of_type(POD_TYPE)) == 1


def test_a_replicate_stack_builds_the_replicate_component():
    raw = stack_documents()["flux-replicate"]
    program, outputs = run("flux-replicate", raw, {"replicateApiToken": "r8_program_test_token"})
    types = {entry.type for entry in program.registrations.values()}
    assert "lorastack:replicate:Training" in types and not any("runpod" in type_ for type_ in types)
    assert outputs["provider"] == "replicate" and "estimatedCostUsd" in outputs
