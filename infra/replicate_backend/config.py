"""The `lorastack:replicate` section of a stack file: the destination model, the trainer, the deployment."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from contract.spec import _Schema
from infra.replicate_backend.catalog import REPLICATE_HARDWARE_USD_PER_SECOND


def _replicate_sku(value: str) -> str:
    if value not in REPLICATE_HARDWARE_USD_PER_SECOND:
        raise ValueError("unknown Replicate hardware SKU; allowed: " + ", ".join(REPLICATE_HARDWARE_USD_PER_SECOND))
    return value


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
            idle = deployment.min_instances * REPLICATE_HARDWARE_USD_PER_SECOND[deployment.hardware] * 3600 * 24 * 30
            if self.monthly_budget_usd is None or self.monthly_budget_usd < idle:
                raise ValueError(
                    f"deployment.minInstances = {deployment.min_instances} keeps {deployment.hardware} running "
                    f"around the clock (about ${idle:,.0f}/month); set monthlyBudgetUsd to at least that, "
                    "or minInstances: 0 to scale to zero"
                )
        return self
