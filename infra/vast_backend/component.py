"""VastTraining: one stack's training run on Vast.ai: one instance, its run mirrored to the stack's bucket.

No volume resource: a Vast volume lives on one machine and dies with it, so what must outlive the instance
(checkpoints, the LoRA, status and history) goes to the S3-compatible bucket of `lorastack:vast.bucket`
(cloudapi/run_mirror.py). The bucket is the user's, so `pulumi destroy` never deletes it.

The instance's environment is the contract of contract/spec.py (ENV_*) plus the mirror's settings; the
instance's own disk is the workspace. HF_TOKEN, WANDB_API_KEY and the bucket's keys make the env one secret Output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import cast

import pulumi

from cloudapi.run_mirror import ENV_MIRROR_ENDPOINT, ENV_MIRROR_URL
from contract.naming import MANAGED_LABEL, pod_name, run_id
from contract.spec import ENV_LIMITS, ENV_RUN_ID, ENV_SPEC, ENV_STACK, ENV_WORKSPACE, WORKSPACE_MOUNT
from contract.workspace import RunPaths
from infra.config import StackConfig
from infra.vast_backend.config import section_of
from infra.vast_backend.instance import Instance, InstanceArgs

# secret config key -> the instance's variable (the bucket's keys under boto3's own names)
INSTANCE_SECRET_ENV = {
    "hfToken": "HF_TOKEN",
    "wandbApiKey": "WANDB_API_KEY",
    "bucketAccessKeyId": "AWS_ACCESS_KEY_ID",
    "bucketSecretAccessKey": "AWS_SECRET_ACCESS_KEY",
}
CONSOLE_URL = "https://cloud.vast.ai/instances/"


@dataclass
class VastTrainingArgs:
    stack: str
    config: StackConfig
    image_ref: pulumi.Input[str]
    secrets: Mapping[str, pulumi.Output | None] = field(default_factory=dict)


class VastTraining(pulumi.ComponentResource):
    instance: Instance
    exports: dict[str, object]

    def __init__(self, name: str, args: VastTrainingArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:vast:Training", name, None, opts)
        config, stack = args.config, args.stack
        vast = section_of(config)
        if vast is None:
            raise ValueError(f"stack {stack}: VastTraining needs the lorastack:vast section")
        if args.secrets.get("vastApiKey") is None:
            raise pulumi.RunError("no Vast.ai API key: `pulumi config set --secret vastApiKey ...` or export VAST_API_KEY")
        missing = [key for key in ("bucketAccessKeyId", "bucketSecretAccessKey") if args.secrets.get(key) is None]
        if missing:
            raise pulumi.RunError(f"no keys for the bucket {vast.bucket.url} (lorastack:vast.bucket): "
                                  + ", ".join(f"`pulumi config set --secret {key} ...`" for key in missing))
        self.instance = Instance(
            f"{name}-instance",
            InstanceArgs(
                label=pod_name(stack), image=args.image_ref, gpu_name=vast.gpu_name, gpu_count=vast.gpu_count,
                min_reliability=vast.min_reliability, max_usd_per_hour=vast.max_usd_per_hour, disk_gb=vast.disk_gb,
                verified=vast.verified, env=instance_env(stack, config, args.secrets),
            ),
            pulumi.ResourceOptions(parent=self),
        )
        gpu = vast.gpu_name if vast.gpu_count == 1 else f"{vast.gpu_count}x {vast.gpu_name}"
        self.exports = {
            "provider": "vast",
            "instanceId": self.instance.id,
            "gpu": f"{gpu} (reliability >= {vast.min_reliability:g}, <= ${vast.max_usd_per_hour:g}/h)",
            "offerUsdPerHour": self.instance.dphTotal,
            "bucket": f"{vast.bucket.url.rstrip('/')}/runs/{run_id(stack, config.train)}",
            **config.cost_estimate().as_outputs(),
            "runId": run_id(stack, config.train),
            "consoleUrl": CONSOLE_URL,
            "logsCommand": f"make logs STACK={stack}",
        }
        self.register_outputs(self.exports)


def instance_env(stack: str, config: StackConfig, secrets: Mapping[str, pulumi.Output | None]) -> pulumi.Input[dict[str, str]]:
    vast = section_of(config)
    plain = {
        ENV_SPEC: config.train.to_env_json(),
        ENV_LIMITS: config.run_limits().model_dump_json(by_alias=True),
        ENV_RUN_ID: run_id(stack, config.train),
        ENV_STACK: stack,
        ENV_WORKSPACE: WORKSPACE_MOUNT,
        "HF_HOME": str(RunPaths(cast(Path, PurePosixPath(WORKSPACE_MOUNT)), run_id(stack, config.train)).hf_home),
        ENV_MIRROR_URL: vast.bucket.url,
        **({ENV_MIRROR_ENDPOINT: vast.bucket.endpoint} if vast.bucket.endpoint else {}),
        **({"AWS_DEFAULT_REGION": vast.bucket.region} if vast.bucket.region else {}),
        **MANAGED_LABEL,
    }
    tokens = {variable: secrets[key] for key, variable in INSTANCE_SECRET_ENV.items() if secrets.get(key) is not None}
    return pulumi.Output.secret(pulumi.Output.all(**tokens).apply(lambda values: {**plain, **values}))
