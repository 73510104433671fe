"""StackConfig: where and how a run happens. Embeds contract.spec.TrainSpec (what to train).

A stack file (`stacks/Pulumi.<stack>.yaml`) holds `lorastack:<key>` entries. The same `parse_stack()`
validates them offline (`make check`, no Pulumi CLI, no credentials) and inside the Pulumi program, so a
bad value fails on a laptop before anything is billed. Every error line names the stack file, the key,
the value and what is allowed. Secrets are not part of this model: they are read separately (`secret()`)
so they never land in a plain object that could be logged or pickled.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from infra import pricing
from contract import memory
from contract.spec import RunLimits, TrainSpec
from training.version import __version__

NAMESPACE = "lorastack"
DEFAULT_REPOSITORY = "ghcr.io/lorastack/trainer"
_SEMVER = re.compile(r"^v?\d+\.\d+\.\d+([-+][\w.]+)?$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class _Schema(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, validate_default=True
    )


class ImageConfig(_Schema):
    """The trainer image, pinned: a semver tag, optionally with its digest. Never `latest`."""

    repository: str = DEFAULT_REPOSITORY
    version: str = __version__
    digest: str | None = None
    build: bool = False  # build and push from this checkout (pulumi-command) instead of pulling a release

    @field_validator("version")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if not _SEMVER.match(value):
            raise ValueError(
                f"must be a pinned semver version like {__version__} (mutable tags such as 'latest' are refused: "
                "a pod restarted next week would run different code)"
            )
        return value

    @field_validator("digest")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not _DIGEST.match(value):
            raise ValueError("must be sha256:<64 hex digits> (as printed by `make image`)")
        return value

    @property
    def ref(self) -> str:
        tagged = f"{self.repository}:{self.version}"
        return f"{tagged}@{self.digest}" if self.digest else tagged

    @classmethod
    def from_reference(cls, reference: str) -> dict[str, str]:
        """'repo:1.2.3@sha256:...' -> the mapping form, so both spellings validate the same way."""
        rest, _, digest = reference.partition("@")
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        repository, version = (rest[:colon], rest[colon + 1 :]) if colon > slash else (rest, "latest")
        return {"repository": repository, "version": version, **({"digest": digest} if digest else {})}


class VolumeConfig(_Schema):
    size_gb: int = Field(default=100, ge=10, le=4096)
    keep_on_destroy: bool = True  # datasets, model cache and checkpoints survive `pulumi destroy`


class RunpodConfig(_Schema):
    gpu_type: str
    gpu_count: int = Field(default=1, ge=1, le=8)
    cloud: Literal["SECURE", "COMMUNITY"] = "SECURE"
    data_center: str | None = None
    container_disk_gb: int = Field(default=40, ge=10, le=1000)
    volume: VolumeConfig | None = Field(default_factory=VolumeConfig)

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        if value not in pricing.RUNPOD_GPUS:
            raise ValueError("unknown RunPod GPU id; allowed: " + ", ".join(sorted(pricing.RUNPOD_GPUS)))
        return value

    @field_validator("data_center")
    @classmethod
    def _known_data_center(cls, value: str | None) -> str | None:
        if value is not None and value not in pricing.RUNPOD_DATA_CENTERS:
            raise ValueError("unknown RunPod data center; allowed: " + ", ".join(pricing.RUNPOD_DATA_CENTERS))
        return value

    @model_validator(mode="after")
    def _volume_rules(self) -> RunpodConfig:
        if self.volume is not None:
            if self.cloud != "SECURE":
                raise ValueError("a network volume needs cloud: SECURE (Community Cloud pods cannot mount one)")
            if self.data_center is None:
                raise ValueError("a network volume is pinned to one data center: set dataCenter (the pod runs there)")
        gpu = pricing.RUNPOD_GPUS[self.gpu_type]
        if self.cloud == "COMMUNITY" and gpu.community_usd is None:
            raise ValueError(f"{self.gpu_type} is not offered on Community Cloud; use cloud: SECURE")
        return self

    @property
    def gpu(self) -> pricing.GpuType:
        return pricing.RUNPOD_GPUS[self.gpu_type]


class DeploymentConfig(_Schema):
    hardware: str = "gpu-l40s"
    # Replicate's bounds (deployments.create/update): min_instances 0..5, max_instances up to 20
    min_instances: int = Field(default=0, ge=0, le=5)  # 0: scale to zero, no idle billing
    max_instances: int = Field(default=1, ge=1, le=20)

    @field_validator("hardware")
    @classmethod
    def _sku(cls, value: str) -> str:
        return _replicate_sku(value)

    @model_validator(mode="after")
    def _bounds(self) -> DeploymentConfig:
        if self.max_instances < self.min_instances:
            raise ValueError(f"maxInstances ({self.max_instances}) is below minInstances ({self.min_instances})")
        return self


class ReplicateConfig(_Schema):
    owner: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    model: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    visibility: Literal["private", "public"] = "private"
    hardware: str = "gpu-h100"  # the destination model's SKU (what predictions run on)
    # what the trainer runs on, and what Replicate bills the training at (ostris/flux-dev-lora-trainer: an H100)
    training_hardware: str = "gpu-h100"
    description: str = "LoRA trained with lorastack"
    trainer: str = Field(default="ostris/flux-dev-lora-trainer", pattern=r"^[\w.-]+/[\w.-]+$")
    trainer_version: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # None: resolve latest at up
    autocaption: bool = False
    keep_model_on_destroy: bool = True
    wait: bool = False  # `pulumi up` follows the training to its end
    deployment: DeploymentConfig | None = None
    monthly_budget_usd: float | None = Field(default=None, gt=0)  # needed for deployment.minInstances > 0

    @field_validator("hardware", "training_hardware")
    @classmethod
    def _sku(cls, value: str) -> str:
        return _replicate_sku(value)

    @model_validator(mode="after")
    def _idle_budget(self) -> ReplicateConfig:
        deployment = self.deployment
        if deployment is not None and deployment.min_instances > 0:
            idle = (
                deployment.min_instances
                * pricing.REPLICATE_HARDWARE_USD_PER_SECOND[deployment.hardware]
                * 3600 * 24 * 30
            )
            if self.monthly_budget_usd is None or self.monthly_budget_usd < idle:
                raise ValueError(
                    f"deployment.minInstances = {deployment.min_instances} keeps {deployment.hardware} running "
                    f"around the clock (about ${idle:,.0f}/month); set monthlyBudgetUsd to at least that, "
                    "or minInstances: 0 to scale to zero"
                )
        return self


def _replicate_sku(value: str) -> str:
    if value not in pricing.REPLICATE_HARDWARE_USD_PER_SECOND:
        raise ValueError("unknown Replicate hardware SKU; allowed: " + ", ".join(pricing.REPLICATE_HARDWARE_USD_PER_SECOND))
    return value


class StackConfig(_Schema):
    provider: Literal["runpod", "replicate"]
    image: ImageConfig = Field(default_factory=ImageConfig)
    runpod: RunpodConfig | None = None
    replicate: ReplicateConfig | None = None
    limits: RunLimits
    wait: bool = False  # `pulumi up` follows the run to its end and downloads the LoRA to outputs/<stack>/
    train: TrainSpec

    @field_validator("image", mode="before")
    @classmethod
    def _image_string(cls, value: object) -> object:
        return ImageConfig.from_reference(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _backend(self) -> StackConfig:
        if self.provider == "runpod":
            if self.runpod is None:
                raise ValueError("provider is runpod but the lorastack:runpod section is missing")
            fits, reason = memory.fits(self.train, self.runpod.gpu.memory_gb)
            if not fits:
                raise ValueError(
                    f"train (batchSize, resolution, precision, gradientCheckpointing) cannot fit runpod.gpuType "
                    f"{self.runpod.gpu_type!r}: {reason}"
                )
        if self.provider == "replicate":
            if self.replicate is None:
                raise ValueError("provider is replicate but the lorastack:replicate section is missing")
            if self.train.family != "flux" and self.replicate.trainer == "ostris/flux-dev-lora-trainer":
                raise ValueError(
                    f"train.family is {self.train.family} but the Replicate trainer {self.replicate.trainer} "
                    "trains FLUX only; set replicate.trainer to a trainer for that family"
                )
        return self

    def usd_per_hour(self, live: dict[str, dict] | None = None) -> tuple[float, str]:
        if self.provider == "runpod":
            return pricing.runpod_usd_per_hour(self.runpod.gpu_type, self.runpod.gpu_count, self.runpod.cloud, live)
        return (
            pricing.REPLICATE_HARDWARE_USD_PER_SECOND[self.replicate.training_hardware] * 3600,
            pricing.REPLICATE_PRICES_SOURCE,
        )

    def cost_estimate(self, live: dict[str, dict] | None = None) -> pricing.CostEstimate:
        usd_per_hour, source = self.usd_per_hour(live)
        if self.provider == "runpod":
            gpu_id = self.runpod.gpu_type
        else:
            gpu_id = pricing.REPLICATE_SKU_GPU[self.replicate.training_hardware]
        count = self.runpod.gpu_count if self.provider == "runpod" else 1
        return pricing.estimate_run(
            usd_per_hour, source, self.train.family, gpu_id, self.train.resolution, self.train.batch_size,
            self.train.gradient_accumulation, self.train.steps, count,
        )

    def run_limits(self) -> RunLimits:
        """The limits the pod enforces, with the price it is billed at filled in."""
        return self.limits.model_copy(update={"usd_per_hour": self.usd_per_hour()[0]})
