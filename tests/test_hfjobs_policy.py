"""The policy pack over what the flux-hfjobs stack declares: its job and repo pass every policy; a public repo and
a job without a usable timeout are refused."""

from __future__ import annotations

import pytest
from pulumi_policy import Secret

from contract.naming import run_id
from infra.hfjobs_backend.catalog import timeout_seconds
from infra.hfjobs_backend.client import managed_labels
from infra.hfjobs_backend.component import TRAINER_COMMAND, job_environment
from infra.stack_files import load_stack

from .test_policy import GENERIC_DYNAMIC_TYPE, all_violations, violations

STACK = "flux-hfjobs"
JOB_TYPE, REPO_TYPE = "pulumi-python:dynamic/hfjobs:Job", "pulumi-python:dynamic/hfjobs:HubRepo"


def job_props(**changes) -> dict:
    """The inputs infra/hfjobs_backend/component.py gives the Job of the stack (JobArgs -> Job props)."""
    config = load_stack(STACK)
    limits = config.run_limits()
    props = {
        "namespace": None, "image": config.image.ref, "flavor": config.hfjobs.flavor, "command": TRAINER_COMMAND,
        "environment": job_environment(STACK, config), "secrets": Secret({"HF_TOKEN": "hf_x"}),
        "timeoutSeconds": float(timeout_seconds(limits.max_hours, limits.max_cost_usd, limits.usd_per_hour)),
        "labels": managed_labels(STACK, run_id(STACK, config.train)), "jobId": None, "stage": None,
        "__provider": "gASVpickled-provider",
    }
    return {**props, **changes}


def repo_props(**changes) -> dict:
    repo = load_stack(STACK).hfjobs.checkpoint_repo
    return {"repoId": repo.repo_id, "private": repo.private, "url": None, **changes}


def test_what_the_stack_declares_passes_every_policy():
    assert all_violations(JOB_TYPE, job_props()) == []
    assert all_violations(REPO_TYPE, repo_props()) == []


def test_a_public_checkpoint_repo_needs_the_explicit_flag():
    assert violations("private-hub-repos", GENERIC_DYNAMIC_TYPE, repo_props(private=False))
    assert violations("private-hub-repos", REPO_TYPE, repo_props(private=False), {"allowPublicRepos": True}) == []


@pytest.mark.parametrize("timeout", [None, 0.0, 30.0])
def test_a_job_without_a_usable_timeout_is_refused(timeout):
    assert violations("hf-jobs-have-timeouts", JOB_TYPE, job_props(timeoutSeconds=timeout))
