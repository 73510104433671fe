"""ReplicateTraining: one stack's training run on Replicate: destination model -> training -> deployment.

The same StackConfig/TrainSpec as the RunPod stacks: the TrainSpec maps onto the trainer's inputs
(training.trainer_input), the dataset is a local folder (zipped and uploaded once per content) or an https
URL of a zip, the Hugging Face and W&B tokens go in as secret inputs. A deployment needs the trained version,
so a stack with one always waits for the training to end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pulumi

from infra.config import StackConfig
from infra.paths import REPO_ROOT
from infra.replicate_backend.catalog import REPLICATE_HARDWARE_USD_PER_SECOND
from infra.replicate_backend.deployment import Deployment, DeploymentArgs
from infra.replicate_backend.model import Model, ModelArgs
from infra.replicate_backend.training import Training, TrainingArgs, is_url, trainer_input

PROJECT_ROOT = REPO_ROOT  # a stack's relative dataset path is relative to the project, not the cwd


@dataclass
class ReplicateTrainingArgs:
    stack: str
    config: StackConfig
    # replicateApiToken, hfToken, wandbApiKey (infra.credentials.secret()); None where not set
    secrets: Mapping[str, pulumi.Output | None] = field(default_factory=dict)


class ReplicateTraining(pulumi.ComponentResource):
    model: Model
    training: Training
    deployment: Deployment | None
    exports: dict[str, object]  # the stack outputs

    def __init__(self, name: str, args: ReplicateTrainingArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:replicate:Training", name, None, opts)
        config, secrets = args.config, args.secrets
        replicate, spec = config.replicate, config.train
        if replicate is None:
            raise ValueError(f"stack {args.stack}: ReplicateTraining needs the lorastack:replicate section")
        # the providers read the token themselves (configure()); this only fails early and clearly
        if secrets.get("replicateApiToken") is None:
            raise ValueError(
                "no Replicate API token: `pulumi config set --secret replicateApiToken r8_...` or export REPLICATE_API_TOKEN"
            )
        if spec.hf_repo and secrets.get("hfToken") is None:
            raise ValueError(
                f"train.hfRepo is {spec.hf_repo} but there is no hfToken to push with: "
                "`pulumi config set --secret hfToken hf_...`"
            )
        if spec.wandb_project and secrets.get("wandbApiKey") is None:
            raise ValueError(
                f"train.wandbProject is {spec.wandb_project} but there is no wandbApiKey: "
                "`pulumi config set --secret wandbApiKey ...`"
            )
        child = pulumi.ResourceOptions(parent=self)

        kept = replicate.keep_model_on_destroy
        self.model = Model(
            f"{name}-model",
            ModelArgs(owner=replicate.owner, name=replicate.model, hardware=replicate.hardware,
                      visibility=replicate.visibility, description=replicate.description, keep_on_destroy=kept),
            # kept: `pulumi destroy` shows it retained, forgets it and never calls the provider's delete
            pulumi.ResourceOptions(parent=self, retain_on_delete=kept),
        )

        # The model's `id` (owner/name, the same as its modelId output): an id stays known in the preview of an
        # update, an output of a dynamic resource does not, and an unknown destination would preview as a replaced
        # training (a new, billed run) whenever only the model's description changes.
        model_ref = self.model.id

        usd_per_second = REPLICATE_HARDWARE_USD_PER_SECOND[replicate.training_hardware]
        self.training = Training(
            f"{name}-training",
            TrainingArgs(
                destination=model_ref,
                trainer_input=trainer_input(spec, replicate.autocaption),
                dataset_source=dataset_source(spec.dataset.source),
                trainer=replicate.trainer,
                trainer_version=replicate.trainer_version,
                caption_extension=spec.dataset.caption_extension,
                default_caption=spec.dataset.default_caption,
                hf_token=secrets.get("hfToken") if spec.hf_repo else None,
                wandb_api_key=secrets.get("wandbApiKey") if spec.wandb_project else None,
                wait=replicate.wait or config.wait or replicate.deployment is not None,
                max_seconds=config.limits.max_hours * 3600,
                max_cost_usd=config.limits.max_cost_usd,
                usd_per_second=usd_per_second,
            ),
            child,
        )

        self.deployment = None
        if replicate.deployment is not None:
            self.deployment = Deployment(
                f"{name}-deployment",
                DeploymentArgs(
                    name=replicate.model,
                    model=model_ref,
                    # passed on as it is (a cast for the type only): the version a finished training made
                    version=cast(pulumi.Output[str], self.training.version),
                    hardware=replicate.deployment.hardware,
                    min_instances=replicate.deployment.min_instances,
                    max_instances=replicate.deployment.max_instances,
                ),
                child,
            )

        self.exports = {
            "provider": "replicate",
            "modelUrl": self.model.url,
            "version": self.training.versionRef,  # owner/name:id, what replicate.run() takes
            "trainingId": self.training.trainingId,
            "status": self.training.status,
            "weights": self.training.weights,
            "trainingUrl": self.training.trainingUrl,
            "usdPerSecond": usd_per_second,
            **config.cost_estimate().as_outputs(),
            "deploymentUrl": self.deployment.url if self.deployment else None,
        }
        self.register_outputs(self.exports)


def dataset_source(source: str) -> str:
    """An https URL as it is; a local folder as an absolute path (the provider runs in another process)."""
    if is_url(source):
        return source
    path = Path(source).expanduser()
    return str(path if path.is_absolute() else PROJECT_ROOT / path)
