"""StackConfig: where and how a run happens. Embeds contract.spec.TrainSpec (what to train).

A stack file (`stacks/Pulumi.<stack>.yaml`) holds `lorastack:<key>` entries. The same `parse_stack()`
validates them offline (`make check`, no Pulumi CLI, no credentials) and inside the Pulumi program, so a
bad value fails on a laptop before anything is billed. Every error line names the stack file, the key,
the value and what is allowed. Secrets are not part of this model: they are read separately (`secret()`)
so they never land in a plain object that could be logged or pickled.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from contract import memory
from contract.spec import RunLimits, TrainSpec, _Schema
from infra import backends, pricing
from infra.backends import Backend, ProviderName
from infra.hfjobs_backend.config import HfJobsConfig
from infra.lambda_backend.config import LambdaConfig
from infra.local_backend.config import LocalConfig
from infra.local_dataset import dataset_folder_problem
from infra.replicate_backend.config import ReplicateConfig
from infra.runpod_backend.config import RunpodConfig
from infra.vast_backend.config import VastConfig
from training.version import __version__

NAMESPACE = "lorastack"
DEFAULT_REPOSITORY = "ghcr.io/lorastack/trainer"
_SEMVER = re.compile(r"^v?\d+\.\d+\.\d+([-+][\w.]+)?$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Docker's reference grammar (distribution/reference): an optional registry host[:port], then lowercase path
# components separated by `/`; a tag is a word character then up to 127 of [\w.-]. Anything else cannot be pulled.
_HOST_PART = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^(?:{_HOST_PART}(?:\.{_HOST_PART})*(?::[0-9]+)?/)?{_PATH_PART}(?:/{_PATH_PART})*$")
_TAG = re.compile(r"^\w[\w.-]{0,127}$")
_MAX_REPOSITORY_LENGTH = 255


def is_pinned(image: str) -> bool:
    """A digest, or a tag other than `latest`: a restarted machine must run the same code (every backend's
    provider checks the image reference it is given)."""
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and name.rsplit(":", 1)[1] not in ("", "latest")


class ImageConfig(_Schema):
    """The trainer image, pinned: a semver tag, optionally with its digest. Never `latest`."""

    repository: str = DEFAULT_REPOSITORY
    version: str = __version__
    digest: str | None = None
    build: bool = False  # build and push from this checkout (pulumi-command) instead of pulling a release

    @field_validator("repository")
    @classmethod
    def _pullable_repository(cls, value: str) -> str:
        if len(value) > _MAX_REPOSITORY_LENGTH or not _REPOSITORY.match(value):
            raise ValueError(
                f"not an image repository Docker can pull: [registry-host[:port]/]path, lowercase letters, digits and "
                f"single . _ - between them, no spaces, at most {_MAX_REPOSITORY_LENGTH} characters "
                f"(like {DEFAULT_REPOSITORY})"
            )
        return value

    @field_validator("version")
    @classmethod
    def _docker_tag(cls, value: str) -> str:
        if not _TAG.match(value):
            raise ValueError(
                "not a Docker tag: a letter, digit or _ then up to 127 letters, digits, _ . or - "
                f"(no spaces, no '+'), like {__version__}"
            )
        return value

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


class StackConfig(_Schema):
    provider: ProviderName
    image: ImageConfig = Field(default_factory=ImageConfig)
    # each backend's section (`lorastack:<provider>`), validated by the model its package defines
    runpod: RunpodConfig | None = None
    replicate: ReplicateConfig | None = None
    local: LocalConfig | None = None
    lambda_cloud: LambdaConfig | None = Field(default=None, alias="lambda")  # `lambda` is a Python keyword
    hfjobs: HfJobsConfig | None = None
    vast: VastConfig | None = None
    limits: RunLimits
    wait: bool = False  # `pulumi up` follows the run to its end and downloads the LoRA to outputs/<stack>/
    train: TrainSpec

    @field_validator("image", mode="before")
    @classmethod
    def _image_string(cls, value: object) -> object:
        return ImageConfig.from_reference(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _backend(self) -> StackConfig:
        if self.section is None:
            raise ValueError(f"provider is {self.provider} but the lorastack:{self.provider} section is missing")
        gpu = self.backend.gpu_memory(self)
        if gpu is not None:
            named, memory_gb = gpu
            fits, reason = memory.fits(self.train, memory_gb)
            if not fits:
                raise ValueError(
                    f"train (batchSize, resolution, precision, gradientCheckpointing) cannot fit {named}: {reason}"
                )
        self.backend.check(self)
        self._limits_cover_the_estimate()
        return self

    def _limits_cover_the_estimate(self) -> None:
        """Limits below the run's own estimate would stop it before it can finish: billed, and nothing to show."""
        if self.limits.allow_below_estimate:
            return
        estimate = self.cost_estimate()
        problems = []
        if self.limits.max_cost_usd < estimate.usd:
            problems.append(f"limits.maxCostUsd ({self.limits.max_cost_usd:g}) is below this run's estimated cost "
                            f"(${estimate.usd:.2f})")
        if self.limits.max_hours < estimate.hours:
            problems.append(f"limits.maxHours ({self.limits.max_hours:g}) is below this run's estimated time "
                            f"({estimate.hours:.2f} h)")
        if problems:
            raise ValueError(
                "; ".join(problems) + f": the run would be stopped before it finishes ({self.train.steps} steps at "
                f"{estimate.seconds_per_step:.2f} s/step, ${estimate.usd_per_hour:.2f}/h, {estimate.source}, with "
                f"{pricing.STARTUP_SECONDS // 60} min of setup). Raise the limits or train fewer steps (`make cost`), or set "
                "limits.allowBelowEstimate: true to stop it early on purpose"
            )

    @model_validator(mode="after")
    def _dataset_folder_reachable(self) -> StackConfig:
        problem = dataset_folder_problem(self.train.dataset.source)
        if problem is not None:
            raise ValueError(problem)
        return self

    @property
    def backend(self) -> Backend:
        return backends.get(self.provider)

    @property
    def section(self) -> Any:
        """The chosen backend's section (`lorastack:<provider>`)."""
        return getattr(self, section_field(self.provider))

    def usd_per_hour(self, live: Any = None) -> tuple[float, str]:
        """$/hour the run is billed at, and the price's source; `live`: the backend's LivePrices.data, if fetched."""
        return self.backend.usd_per_hour(self, live)

    def cost_estimate(self, live: Any = None) -> pricing.CostEstimate:
        usd_per_hour, source = self.usd_per_hour(live)
        gpu_id, count = self.backend.performance_gpu(self)
        return pricing.estimate_run(
            usd_per_hour, source, self.train.family, gpu_id, self.train.resolution, self.train.batch_size,
            self.train.gradient_accumulation, self.train.steps, count, base_model=self.train.base_model,
        )

    def run_limits(self) -> RunLimits:
        """The limits the pod enforces, with the price it is billed at filled in."""
        return self.limits.model_copy(update={"usd_per_hour": self.usd_per_hour()[0]})


def section_field(provider: str) -> str:
    """The StackConfig field holding a provider's section: the field whose alias is the provider name (the field
    is named after the provider, except where that name is a Python keyword: `lambda` -> lambda_cloud)."""
    return next(name for name, field in StackConfig.model_fields.items() if (field.alias or name) == provider)
