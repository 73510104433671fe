"""The `lorastack:hfjobs` section of a stack file: which hardware flavor, whose namespace, the Hub repo that holds
checkpoints and the LoRA."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, cast

from pydantic import field_validator

from contract.spec import _Schema
from infra.hfjobs_backend.catalog import HFJOBS_FLAVORS, Flavor

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class CheckpointRepoConfig(_Schema):
    """The Hub model repo the job pushes each complete checkpoint to and resumes from (it outlives the job)."""

    repo_id: str  # e.g. "alice/flux-lora-checkpoints"
    private: bool = True
    keep_on_destroy: bool = True  # checkpoints survive `pulumi destroy`

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not _REPO_ID.match(value):
            raise ValueError("must be a Hub repo id 'namespace/name' (letters, digits, '-', '_', '.')")
        return value


class HfJobsConfig(_Schema):
    flavor: str
    namespace: str | None = None  # the user or org that runs (and pays for) the job; default: the token's user
    checkpoint_repo: CheckpointRepoConfig

    @field_validator("flavor")
    @classmethod
    def _known_flavor(cls, value: str) -> str:
        if value not in HFJOBS_FLAVORS:
            raise ValueError("unknown Hugging Face Jobs GPU flavor; allowed: " + ", ".join(HFJOBS_FLAVORS))
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and not _NAMESPACE.match(value):
            raise ValueError("must be a Hub user or organization name (letters, digits, '-', '_', '.')")
        return value

    @property
    def hardware(self) -> Flavor:
        return HFJOBS_FLAVORS[self.flavor]


if TYPE_CHECKING:
    from infra.config import StackConfig


def section_of(config: StackConfig) -> HfJobsConfig:
    """The stack's `lorastack:hfjobs` section: StackConfig refuses a hfjobs stack without one, and this backend is
    only asked about its own stacks."""
    return cast(HfJobsConfig, config.hfjobs)  # never None here (StackConfig's _backend check)
