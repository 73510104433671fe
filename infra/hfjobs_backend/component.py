"""HfJobsTraining: one stack's training run on Hugging Face Jobs: the Hub repo for checkpoints and the LoRA, and
the job running our trainer image.

The job's environment is the contract of contract/spec.py (ENV_*), with the workspace on the job's own disk and
the checkpoint mirror pointing at the repo; the HF token (which the trainer pushes with) and the W&B key go in
the job's `secrets`, never in its environment or the plain state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import cast

import pulumi

from contract.naming import MANAGED_LABEL, run_id
from contract.spec import (
    ENV_CHECKPOINT_REPO,
    ENV_CHECKPOINT_REPO_PRIVATE,
    ENV_LIMITS,
    ENV_RUN_ID,
    ENV_SPEC,
    ENV_STACK,
    ENV_WORKSPACE,
    WORKSPACE_MOUNT,
)
from contract.workspace import RunPaths
from infra.config import StackConfig
from infra.hfjobs_backend.catalog import timeout_seconds
from infra.hfjobs_backend.client import endpoint, managed_labels
from infra.hfjobs_backend.config import section_of
from infra.hfjobs_backend.job import Job, JobArgs
from infra.hfjobs_backend.repo import HubRepo, HubRepoArgs

JOB_SECRET_ENV = {"hfToken": "HF_TOKEN", "wandbApiKey": "WANDB_API_KEY"}  # secret config key -> the job's variable
TRAINER_COMMAND = ["python", "-m", "training"]


@dataclass
class HfJobsTrainingArgs:
    stack: str
    config: StackConfig
    image_ref: pulumi.Input[str]
    secrets: Mapping[str, pulumi.Output | None] = field(default_factory=dict)  # hfToken, wandbApiKey


class HfJobsTraining(pulumi.ComponentResource):
    repo: HubRepo
    job: Job
    exports: dict[str, object]

    def __init__(self, name: str, args: HfJobsTrainingArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:hfjobs:Training", name, None, opts)
        config, stack = args.config, args.stack
        hfjobs = section_of(config)
        if args.secrets.get("hfToken") is None:
            raise pulumi.RunError("no Hugging Face token: `pulumi config set --secret hfToken ...` or export HF_TOKEN "
                                  "(a token that may start Jobs and write the checkpoint repo)")
        repo = hfjobs.checkpoint_repo
        kept = repo.keep_on_destroy
        self.repo = HubRepo(f"{name}-repo", HubRepoArgs(repo_id=repo.repo_id, private=repo.private),
                            # kept: `pulumi destroy` forgets the repo and never calls the provider's delete
                            pulumi.ResourceOptions(parent=self, retain_on_delete=kept))
        limits = config.run_limits()
        the_run = run_id(stack, config.train)
        self.job = Job(
            f"{name}-job",
            JobArgs(
                namespace=hfjobs.namespace,
                image=args.image_ref,
                flavor=hfjobs.flavor,
                command=TRAINER_COMMAND,
                environment=job_environment(stack, config),
                secrets=job_secrets(args.secrets),
                timeout_seconds=timeout_seconds(limits.max_hours, limits.max_cost_usd, limits.usd_per_hour),
                labels=managed_labels(stack, the_run),
            ),
            pulumi.ResourceOptions(parent=self, depends_on=[self.repo]),
        )
        flavor = hfjobs.hardware
        self.exports = {
            "provider": "hfjobs",
            "jobId": self.job.id,
            "flavor": hfjobs.flavor,
            "gpu": f"{flavor.gpu} x{flavor.gpu_count}",
            "checkpointRepo": f"{endpoint()}/{repo.repo_id}",
            **config.cost_estimate().as_outputs(),
            "runId": the_run,
            "jobUrl": self.job.url,
            "logsCommand": f"make logs STACK={stack}",
        }
        self.register_outputs(self.exports)


def job_environment(stack: str, config: StackConfig) -> dict[str, str]:
    repo = section_of(config).checkpoint_repo
    return {
        ENV_SPEC: config.train.to_env_json(),
        ENV_LIMITS: config.run_limits().model_dump_json(by_alias=True),
        ENV_RUN_ID: run_id(stack, config.train),
        ENV_STACK: stack,
        ENV_WORKSPACE: WORKSPACE_MOUNT,
        "HF_HOME": str(RunPaths(cast(Path, PurePosixPath(WORKSPACE_MOUNT)), run_id(stack, config.train)).hf_home),
        ENV_CHECKPOINT_REPO: repo.repo_id,
        ENV_CHECKPOINT_REPO_PRIVATE: "1" if repo.private else "0",
        **MANAGED_LABEL,
    }


def job_secrets(secrets: Mapping[str, pulumi.Output | None]) -> pulumi.Input[dict[str, str]]:
    present = {variable: secrets[key] for key, variable in JOB_SECRET_ENV.items() if secrets.get(key) is not None}
    return pulumi.Output.secret(pulumi.Output.all(**present))
