"""The `lorastack:lambda` section of a stack file: which instance type, in which region, and the filesystem."""

from __future__ import annotations

from pydantic import Field, field_validator

from contract.spec import _Schema
from infra.lambda_backend.catalog import LAMBDA_INSTANCE_TYPES, LAMBDA_REGIONS, InstanceType


class FilesystemConfig(_Schema):
    # Lambda filesystems have no size: they grow with what is written and bill per GiB used
    keep_on_destroy: bool = True  # datasets, model cache and checkpoints survive `pulumi destroy`


class LambdaConfig(_Schema):
    instance_type: str
    region: str  # the instance and its filesystem live here (filesystems are region-locked)
    ssh_key_name: str  # Lambda's launch requires exactly one SSH key, registered in the account beforehand
    filesystem: FilesystemConfig | None = Field(default_factory=FilesystemConfig)

    @field_validator("instance_type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in LAMBDA_INSTANCE_TYPES:
            raise ValueError("unknown Lambda instance type; allowed: " + ", ".join(sorted(LAMBDA_INSTANCE_TYPES)))
        return value

    @field_validator("region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        if value not in LAMBDA_REGIONS:
            raise ValueError("unknown Lambda region; allowed: " + ", ".join(LAMBDA_REGIONS))
        return value

    @field_validator("ssh_key_name")
    @classmethod
    def _key_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name an SSH key registered in your Lambda account (Lambda launches need exactly one)")
        return value

    @property
    def kind(self) -> InstanceType:
        return LAMBDA_INSTANCE_TYPES[self.instance_type]
