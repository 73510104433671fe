"""The `lorastack:vast` section of a stack file: which offer to rent and the bucket that holds the run."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from pydantic import Field, field_validator, model_validator

from cloudapi.run_mirror import parse_url
from contract.spec import _Schema
from infra.vast_backend.catalog import VAST_GPUS, VastGpu


class BucketConfig(_Schema):
    """An S3-compatible bucket: checkpoints and results outlive the instance (a Vast volume lives on one machine,
    so it does not survive a lost host). Keys: bucketAccessKeyId / bucketSecretAccessKey (secrets)."""

    url: str  # s3://bucket/prefix
    endpoint: str | None = None  # e.g. https://<account>.r2.cloudflarestorage.com; unset for AWS S3
    region: str | None = None

    @field_validator("url")
    @classmethod
    def _s3_url(cls, value: str) -> str:
        parse_url(value)
        return value

    @field_validator("endpoint")
    @classmethod
    def _http_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError(f"{value!r}: an endpoint is an http(s) URL")
        return value


class VastConfig(_Schema):
    gpu_name: str  # an offer's gpu_name, e.g. "RTX 4090"
    gpu_count: int = Field(default=1, ge=1, le=8)
    min_reliability: float = Field(default=0.98, ge=0.0, le=1.0)  # the host's reliability score
    max_usd_per_hour: float = Field(gt=0, le=128)  # ceiling on the offer's dph_total (GPUs and disk)
    disk_gb: int = Field(default=80, ge=10, le=2000)  # fixed at create: model cache, dataset, checkpoints
    verified: bool = True  # only hosts Vast.ai has verified
    bucket: BucketConfig

    @field_validator("gpu_name")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        if value not in VAST_GPUS:
            raise ValueError("unknown Vast.ai gpu_name; allowed: " + ", ".join(VAST_GPUS))
        return value

    @model_validator(mode="after")
    def _ceiling_can_be_met(self) -> VastConfig:
        lowest = self.gpu.typical_usd * self.gpu_count
        if self.max_usd_per_hour < lowest:
            raise ValueError(
                f"maxUsdPerHour {self.max_usd_per_hour:g} is below the lowest recorded rate for {self.gpu_count}x "
                f"{self.gpu_name} (${lowest:.2f}/h): no offer would match; raise it")
        return self

    @property
    def gpu(self) -> VastGpu:
        return VAST_GPUS[self.gpu_name]


if TYPE_CHECKING:
    from infra.config import StackConfig


def section_of(config: StackConfig) -> VastConfig:
    """The stack's `lorastack:vast` section: StackConfig refuses a vast stack without one, and this backend is
    only asked about its own stacks."""
    return cast(VastConfig, config.vast)  # never None here (StackConfig's _backend check)
