"""One package per cloud: the registry finds every backend, the cloud-free modules name none, and the trainer
reaches its machine only through the host interface (cloudapi/hosts.py)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import typing
from pathlib import Path

import pulumi
import pytest

from cloudapi import hosts
from contract.workspace import workspace_root
from infra import backends
from infra.config import StackConfig, section_field
from infra.credentials import SECRETS
from infra.paths import REPO_ROOT
from infra.stack_files import STACKS_DIR, load_stack

CLOUD_FREE_MODULES = ("infra/program.py", "infra/ops.py", "infra/reaper.py", "infra/cost.py")
# what the trainer may import from the shared vendor package: the host interface, nothing cloud-specific
TRAINER_ALLOWED_CLOUDAPI = {"cloudapi.hosts"}
VENDOR_SDKS = {"runpod", "replicate", "boto3", "botocore"}


# --- the registry -----------------------------------------------------------------------------------------------


def test_every_backend_package_is_registered_and_implements_the_interface():
    packages = {path.parent.name.removesuffix("_backend") for path in (REPO_ROOT / "infra").glob("*_backend/__init__.py")}
    assert packages == set(backends.names())
    hooks = [name for name, member in vars(backends.Backend).items() if callable(member) and not name.startswith("_")]
    assert {"check", "gpu_memory", "usd_per_hour", "build", "status", "logs", "fetch", "reap", "live_prices"} <= set(hooks)
    for name in backends.names():
        backend = backends.get(name)
        assert backend.name == name
        for hook in hooks:
            ours = inspect.signature(getattr(backend, hook))
            theirs = inspect.signature(getattr(backends.Backend, hook))
            assert list(ours.parameters) == list(theirs.parameters)[1:], f"{name}.{hook}{ours} != Backend.{hook}{theirs}"
        # its section is the stack file's lorastack:<name>, validated by the model its package defines
        field = StackConfig.model_fields[section_field(name)]
        assert (field.alias or section_field(name)) == name
        assert backend.section in typing.get_args(field.annotation)
        assert importlib.import_module(backends.policies_module(name)).POLICIES
        assert set(backend.ops_secrets + backend.ops_optional_secrets) <= set(SECRETS)
        if isinstance(backend, backends.RunsOurTrainer):  # its component and args classes are where it says
            module_name, component, args = backend.component.split(":")
            module = importlib.import_module(module_name)
            assert issubclass(getattr(module, component), pulumi.ComponentResource)
            assert dataclasses.is_dataclass(getattr(module, args))


def test_the_provider_values_are_the_registrys_names():
    assert typing.get_args(StackConfig.model_fields["provider"].annotation) == backends.names()
    with pytest.raises(ValueError, match="allowed: runpod, replicate"):
        backends.get("lambda-labs")


def test_every_shipped_stack_is_priced_and_described_by_its_backend():
    for path in sorted(STACKS_DIR.glob("Pulumi.*.yaml")):
        stack = path.name.removeprefix("Pulumi.").removesuffix(".yaml")
        config = load_stack(stack)
        assert config.backend is backends.get(config.provider)
        assert config.section is getattr(config, section_field(config.provider))
        usd_per_hour, source = config.usd_per_hour()
        assert usd_per_hour > 0 and source
        assert config.cost_estimate().usd > 0
        assert config.backend.hardware(config)


# --- no provider named outside the backends ----------------------------------------------------------------------


def named_providers(source: str) -> list[str]:
    """Provider names in the code (identifiers, imported modules, string constants), docstrings left out."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append(node.value)
        elif isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            words += [getattr(node, "module", None) or "", *(alias.name for alias in node.names)]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            words.append(node.name)
    return [word for word in words for name in backends.names() if name in word.lower()]


def test_the_checker_finds_a_provider_branch():
    assert named_providers('if config.provider == "runpod":\n    pass\n') == ["runpod"]
    assert named_providers("from infra.replicate_backend.component import ReplicateTraining\n")
    assert named_providers('"""Docs may say RunPod."""\nx = 1  # and comments: runpod\n') == []


@pytest.mark.parametrize("module", CLOUD_FREE_MODULES)
def test_the_program_and_the_commands_name_no_provider(module):
    assert named_providers((REPO_ROOT / module).read_text()) == []


# --- the trainer knows no cloud ------------------------------------------------------------------------------------


def forbidden_imports(source: str) -> list[str]:
    """Imports a trainer module must not make: infra, a vendor SDK, or cloudapi beyond the host interface."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names if node.module == "cloudapi"]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top == "infra" or top in VENDOR_SDKS:
                found.append(module)
            elif top == "cloudapi" and module != "cloudapi" and module not in TRAINER_ALLOWED_CLOUDAPI:
                found.append(module)
    return found


def test_the_import_checker_finds_a_cloud_client():
    assert forbidden_imports("from cloudapi.runpod_rest import RunpodClient\n") == ["cloudapi.runpod_rest"]
    assert forbidden_imports("from cloudapi import runpod_rest\n") == ["cloudapi.runpod_rest"]
    assert forbidden_imports("import replicate\nfrom infra import pricing\n") == ["replicate", "infra"]
    assert forbidden_imports("from cloudapi.hosts import host_from_environment\n") == []


def test_no_trainer_module_imports_infra_or_a_cloud_client():
    modules = sorted((REPO_ROOT / "training").rglob("*.py"))
    assert REPO_ROOT / "training" / "lifecycle.py" in modules
    problems = {str(path.relative_to(REPO_ROOT)): found for path in modules if (found := forbidden_imports(path.read_text()))}
    assert problems == {}


# --- the host interface ---------------------------------------------------------------------------------------------


def test_the_host_is_chosen_from_the_environment():
    said: list[str] = []
    local = hosts.host_from_environment({"LORASTACK_WORKSPACE": "/mnt/volume"}, said.append)
    assert isinstance(local, hosts.LocalHost) and local.machine_id == ""
    assert local.storage_root() == Path("/mnt/volume") == workspace_root({"LORASTACK_WORKSPACE": "/mnt/volume"})
    assert local.billed_usd_per_hour() is None
    assert local.stop(retries=0, backoff_s=0) and "a local run" in said[0]
    pod = hosts.host_from_environment({"RUNPOD_POD_ID": "pod123", "RUNPOD_API_KEY": "k"}, said.append)
    assert isinstance(pod, hosts.RunpodHost) and pod.machine_id == "pod123"
    assert pod.storage_root() == Path("/workspace")


# --- the commands go through the stack's backend ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "logs"])  # fetch downloads the weights: tests/test_replicate_fetch.py
def test_a_replicate_stack_is_pointed_at_replicate_by_every_command(command, monkeypatch, capsys):
    from infra import ops

    monkeypatch.delenv("LORASTACK_WORKSPACE", raising=False)
    config = load_stack("flux-replicate")
    assert config.train.hf_repo is None  # else fetch reads the Hub, for every backend alike
    assert ops.main([command, "flux-replicate"]) == 2
    err = capsys.readouterr().err
    assert f"`make {command}` follows RunPod pods" in err
    assert f"https://replicate.com/{config.replicate.owner}/{config.replicate.model}" in err
