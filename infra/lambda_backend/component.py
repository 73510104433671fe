"""LambdaTraining: one stack's training run on Lambda Cloud: a filesystem (when configured) and the instance.

The instance boots our pinned trainer image through its user data (infra/lambda_backend/user_data.py) with the
pod environment every backend gives the trainer (contract/spec.py ENV_*, built by the RunPod component's
`pod_env`), plus what the trainer needs to terminate its own instance: LAMBDA_INSTANCE_NAME (the instance's unique
name) and LAMBDA_API_KEY. The user data therefore holds secrets and is a secret Output.

Tags mark the instance for the reaper: lorastack-managed, lorastack-stack and the limits (Lambda's instance list
carries tags but no launch time; the provider adds a launch-time tag itself, infra/lambda_backend/instance.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import pulumi

from cloudapi.hosts import ENV_LAMBDA_API_KEY, ENV_LAMBDA_INSTANCE_NAME
from contract.naming import pod_name, run_id
from infra.config import StackConfig
from infra.lambda_backend import reap, user_data
from infra.lambda_backend.config import LambdaConfig
from infra.lambda_backend.filesystem import Filesystem, FilesystemArgs
from infra.lambda_backend.instance import Instance, InstanceArgs
from infra.runpod_backend.component import pod_env

CONSOLE_URL = "https://cloud.lambda.ai/instances"


@dataclass
class LambdaTrainingArgs:
    stack: str
    config: StackConfig
    image_ref: pulumi.Input[str]
    # lambdaApiKey, hfToken, wandbApiKey (infra.credentials.secret()); None where not set
    secrets: Mapping[str, pulumi.Output | None] = field(default_factory=dict)


class LambdaTraining(pulumi.ComponentResource):
    filesystem: Filesystem | None
    instance: Instance
    exports: dict[str, object]

    def __init__(self, name: str, args: LambdaTrainingArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:lambda:Training", name, None, opts)
        config, stack = args.config, args.stack
        section = cast(LambdaConfig, config.lambda_cloud)  # a lambda stack has its section (StackConfig's _backend check)
        api_key = args.secrets.get("lambdaApiKey")
        if api_key is None:
            raise pulumi.RunError(
                "no Lambda Cloud API key: `pulumi config set --secret lambdaApiKey ...` or export LAMBDA_API_KEY"
            )

        self.filesystem = None
        filesystem_name: str | None = None
        file_system_names: list[pulumi.Input[str]] = []
        if section.filesystem is not None:
            kept = section.filesystem.keep_on_destroy
            filesystem_name = created_name = pod_name(stack)
            self.filesystem = Filesystem(
                f"{name}-filesystem",
                FilesystemArgs(name=filesystem_name, region=section.region, keep_on_destroy=kept),
                # kept: `pulumi destroy` forgets the filesystem and says so, and never calls the provider's delete
                pulumi.ResourceOptions(parent=self, retain_on_delete=kept),
            )
            # the filesystem's name once it exists: the instance launches after it
            file_system_names = [self.filesystem.id.apply(lambda _: created_name)]

        instance_name = pod_name(stack)
        env = pulumi.Output.all(pod_env(stack, config, args.secrets), api_key, args.image_ref).apply(
            lambda values: user_data.render(
                values[2], {**values[0], ENV_LAMBDA_INSTANCE_NAME: instance_name, ENV_LAMBDA_API_KEY: values[1]},
                filesystem_name,
            )
        )
        self.instance = Instance(
            f"{name}-instance",
            InstanceArgs(
                name=instance_name,
                instance_type_name=section.instance_type,
                region_name=section.region,
                ssh_key_names=[section.ssh_key_name],
                user_data=pulumi.Output.secret(env),
                file_system_names=file_system_names,
                tags=reap.tags(stack, config.limits),
            ),
            pulumi.ResourceOptions(parent=self, depends_on=[self.filesystem] if self.filesystem else []),
        )

        kind = section.kind
        self.exports = {
            "provider": "lambda",
            "instanceId": self.instance.id,
            "filesystem": filesystem_name,
            "region": section.region,
            "gpu": f"{section.instance_type} ({kind.label})",
            **config.cost_estimate().as_outputs(),
            "runId": run_id(stack, config.train),
            "consoleUrl": CONSOLE_URL,
            "statusCommand": f"make status STACK={stack}",
        }
        self.register_outputs(self.exports)
