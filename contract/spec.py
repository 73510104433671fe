"""What to train: the one schema that infra validates on a laptop and the trainer validates again in the pod.

Pure pydantic, no torch: `infra/` imports this module, and `pulumi preview` must not load a deep-learning stack.
Keys are camelCase in stack files and in the pod's environment (Pulumi config convention); Python code
uses the snake_case attribute names.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from contract.families import FAMILY_NAMES, facts_for

Family = Literal[FAMILY_NAMES]  # the names contract/families.py registers, in its order
Precision = Literal["bf16", "fp16", "fp32"]
Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
Toggle = Literal["auto", "on", "off"]

# The pod's environment: the names infra sets and the trainer reads. One place, both sides import it.
ENV_SPEC = "LORASTACK_SPEC"  # TrainSpec as JSON (camelCase keys)
ENV_SPEC_FILE = "LORASTACK_SPEC_FILE"  # or a path to a JSON/YAML file holding it
ENV_LIMITS = "LORASTACK_LIMITS"  # RunLimits as JSON
ENV_RUN_ID = "LORASTACK_RUN_ID"
ENV_STACK = "LORASTACK_STACK"
ENV_WORKSPACE = "LORASTACK_WORKSPACE"  # the network volume's mount point, /workspace on a pod
ENV_MANAGED = "LORASTACK_MANAGED"  # "1" on every pod lorastack creates: the reaper's label
# A Hub model repo that mirrors the run's checkpoints and LoRA, for machines whose disk dies with them: the trainer
# pushes each complete checkpoint there and resumes from the newest one (cloudapi/checkpoint_mirror.py)
ENV_CHECKPOINT_REPO = "LORASTACK_CHECKPOINT_REPO"
ENV_CHECKPOINT_REPO_PRIVATE = "LORASTACK_CHECKPOINT_REPO_PRIVATE"  # "1" (the default): created private
WORKSPACE_MOUNT = "/workspace"


class _Schema(BaseModel):
    """camelCase aliases, unknown keys refused (a typo in a stack file must not be silently ignored), and no
    booleans where numbers go (pydantic would read `steps: true` as 1)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, validate_default=True
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, bool) and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("must be a number, not true/false")
        return value


def _is_number(annotation: object) -> bool:
    """int, float, or either with None."""
    return annotation in (int, float) or any(arg in (int, float) for arg in get_args(annotation))


class DatasetSpec(_Schema):
    # A local folder of images with same-named .txt captions (kohya convention), an http(s) URL of a
    # .zip/.tar(.gz) of such a folder, or a Hugging Face dataset id ("owner/name", optionally "hf://owner/name").
    source: str = Field(min_length=1)
    image_column: str = "image"  # Hugging Face datasets only
    caption_column: str = "text"  # Hugging Face datasets only
    caption_extension: str = ".txt"
    repeats: int = Field(default=1, ge=1, le=1000)
    default_caption: str = ""  # for images without a caption file

    @field_validator("caption_extension")
    @classmethod
    def _dot(cls, value: str) -> str:
        if not value.startswith("."):
            raise ValueError(f"must start with a dot, like '.txt' (got {value!r})")
        return value


class TrainSpec(_Schema):
    family: Family
    base_model: str = Field(min_length=1, description="Hugging Face model id or a local path")
    revision: str | None = None
    dataset: DatasetSpec
    trigger_word: str | None = None
    resolution: int = Field(default=1024, ge=256, le=2048)
    aspect_buckets: bool = True
    steps: int = Field(default=1000, ge=1, le=200_000)
    rank: int = Field(default=16, ge=1, le=256)
    alpha: float | None = Field(default=None, gt=0, le=1024)  # None: alpha = rank (scale 1.0)
    train_text_encoder: bool = False
    learning_rate: float = Field(default=1e-4, gt=0, le=1e-2)
    text_encoder_learning_rate: float | None = Field(default=None, gt=0, le=1e-2)
    lr_scheduler: Scheduler = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    batch_size: int = Field(default=1, ge=1, le=64)
    gradient_accumulation: int = Field(default=1, ge=1, le=128)
    precision: Precision = "bf16"
    gradient_checkpointing: Toggle = "auto"  # auto: on only when the memory estimate needs it
    cache_latents: bool = True  # VAE latents and text embeddings computed once, cached on the volume
    max_grad_norm: float = Field(default=1.0, gt=0)
    min_snr_gamma: float | None = Field(default=None, gt=0, le=20)
    noise_offset: float = Field(default=0.0, ge=0, le=0.5)
    checkpoint_every: int = Field(default=250, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1, le=100)
    sample_prompts: list[str] = Field(default_factory=list, max_length=16)
    sample_every: int | None = Field(default=None, ge=1)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    wandb_project: str | None = None
    hf_repo: str | None = Field(default=None, pattern=r"^[\w.-]+/[\w.-]+$")

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: object) -> object:
        # YAML 1.1 reads a bare on/off as a boolean
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _coherent(self) -> TrainSpec:
        if self.resolution % 64:
            raise ValueError(f"resolution must be a multiple of 64 (got {self.resolution})")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmupSteps ({self.warmup_steps}) must be less than steps ({self.steps})")
        facts = facts_for(self.family)
        if self.train_text_encoder and not facts.trains_text_encoder:
            raise ValueError(f"trainTextEncoder is not supported for {facts.name} ({facts.denoiser} LoRA only)")
        if self.precision == "fp16" and not facts.trains_in_fp16:
            raise ValueError(f"{facts.name} trains in bf16 or fp32: its activations overflow fp16")
        if self.sample_every is not None and not self.sample_prompts:
            raise ValueError("sampleEvery is set but samplePrompts is empty")
        if self.text_encoder_learning_rate is not None and not self.train_text_encoder:
            raise ValueError("textEncoderLearningRate is set but trainTextEncoder is false")
        return self

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)

    def to_env_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """Short content hash: a changed spec is a new run (its own directory on the volume)."""
        return hashlib.sha256(self.to_env_json().encode()).hexdigest()[:10]


class RunLimits(_Schema):
    """Every pod has a time and a money limit; the trainer stops its pod at either."""

    max_hours: float = Field(gt=0, le=168)
    max_cost_usd: float = Field(gt=0, le=10_000)
    stall_minutes: float = Field(default=20, gt=0, le=24 * 60)  # no step for this long: the watchdog stops the pod
    # before the first step (model download, dataset preparation, latent caching) the watchdog allows this long
    setup_minutes: float = Field(default=60, gt=0, le=24 * 60)
    usd_per_hour: float = Field(default=0.0, ge=0)  # filled in by infra from the price of the chosen GPU


class SpecError(ValueError):
    """Invalid configuration; `problems` holds one line per bad key, each naming file, key, value and rule."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _show(value: object) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_errors(error: ValidationError, source: str, prefix: str) -> list[str]:
    """One readable line per pydantic error: `<source>: <prefix>.<key> = <value>: <what is allowed>`."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "").rstrip(":") or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if isinstance(item["input"], dict) and item["type"] == "value_error":
            lines.append(f"{source}: {key}: {message}")  # a rule across keys: the message names them
        elif item["type"] == "extra_forbidden":
            lines.append(f"{source}: {key}: unknown key (check its spelling)")
        elif item["type"] == "missing":
            lines.append(f"{source}: {key}: required key is missing")
        else:
            lines.append(f"{source}: {key} = {_show(item['input'])}: {message}")
    return lines


def parse_spec(raw: object, source: str, prefix: str = "train") -> TrainSpec:
    try:
        return TrainSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(describe_errors(error, source, prefix)) from None


def spec_from_environment(environ: dict[str, str] | None = None) -> TrainSpec:
    """The trainer's entry: LORASTACK_SPEC (JSON) or LORASTACK_SPEC_FILE (JSON or YAML)."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_SPEC):
        source = f"${ENV_SPEC}"
        try:
            raw = json.loads(environ[ENV_SPEC])
        except json.JSONDecodeError as error:
            raise SpecError([f"{source}: not valid JSON ({error})"]) from None
    elif environ.get(ENV_SPEC_FILE):
        source = environ[ENV_SPEC_FILE]
        import yaml  # only here: a spec file may be YAML

        with open(source, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    else:
        raise SpecError([f"no training spec: set {ENV_SPEC} (JSON) or {ENV_SPEC_FILE} (path to JSON/YAML)"])
    return parse_spec(raw, source, prefix="")
