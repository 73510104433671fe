"""What to train: the one schema that infra validates on a laptop and the trainer validates again in the pod.

Pure pydantic, no torch: `infra/` imports this module, and `pulumi preview` must not load a deep-learning stack.
Keys are camelCase in stack files and in the pod's environment (Pulumi config convention); Python code
uses the snake_case attribute names.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Literal, cast, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from contract.families import FAMILY_NAMES, WEIGHTING_SCHEMES, FlowMatchingDefaults, facts_for, family_of_base_model
from contract.redaction import redacted_source

if TYPE_CHECKING:
    Family = str  # a Literal built at runtime from a tuple is not a static type: mypy reads it as str
else:
    Family = Literal[FAMILY_NAMES]  # the names contract/families.py registers, in its order
Precision = Literal["bf16", "fp16", "fp32"]
Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
Toggle = Literal["auto", "on", "off"]
if TYPE_CHECKING:
    WeightingScheme = str
else:
    WeightingScheme = Literal[WEIGHTING_SCHEMES]

# The pod's environment: the names infra sets and the trainer reads. One place, both sides import it.
ENV_SPEC = "LORASTACK_SPEC"  # TrainSpec as JSON (camelCase keys)
ENV_SPEC_FILE = "LORASTACK_SPEC_FILE"  # or a path to a JSON/YAML file holding it
ENV_LIMITS = "LORASTACK_LIMITS"  # RunLimits as JSON
ENV_RUN_ID = "LORASTACK_RUN_ID"
ENV_STACK = "LORASTACK_STACK"
ENV_WORKSPACE = "LORASTACK_WORKSPACE"  # the network volume's mount point, /workspace on a pod
ENV_MANAGED = "LORASTACK_MANAGED"  # "1" on every pod lorastack creates: the reaper's label
# the dataset URL with its credentials, when it has any (the spec then holds contract.redaction's form); the
# name says SECRET so that the trainer's redact() hides it in everything it prints
ENV_DATASET_SOURCE = "LORASTACK_DATASET_SOURCE_SECRET"
# A Hub model repo that mirrors the run's checkpoints and LoRA, for machines whose disk dies with them: the trainer
# pushes each complete checkpoint there and resumes from the newest one (cloudapi/checkpoint_mirror.py)
ENV_CHECKPOINT_REPO = "LORASTACK_CHECKPOINT_REPO"
ENV_CHECKPOINT_REPO_PRIVATE = "LORASTACK_CHECKPOINT_REPO_PRIVATE"  # "1" (the default): created private
WORKSPACE_MOUNT = "/workspace"

# The spec reaches the pod as one environment variable, and Linux refuses to start a process when one
# "NAME=value" string passes MAX_ARG_STRLEN (128 KiB): the entrypoint would never run, so none of the trainer's
# safeguards would, while the pod bills. Every free-text field is bounded, and so is the spec as a whole (with
# room to spare for the other variables).
MAX_ENV_VALUE_BYTES = 128 * 1024  # the kernel's limit on one environment string
MAX_SPEC_ENV_BYTES = 32 * 1024  # what $LORASTACK_SPEC may take
MAX_ID_CHARS = 256  # model ids, revisions, paths, column names, project names
MAX_URL_CHARS = 2048  # dataset sources (URLs with signed query strings are long)
MAX_TEXT_CHARS = 1000  # one caption or prompt
MAX_WORD_CHARS = 64  # trigger word, caption extension


class _Schema(BaseModel):
    """camelCase aliases, unknown keys refused (a typo in a stack file must not be silently ignored), no
    booleans where numbers go (pydantic would read `steps: true` as 1), and no infinite or NaN numbers (YAML's
    `.inf` would otherwise pass every `gt=0` bound that has no upper one)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, validate_default=True,
        allow_inf_nan=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: object, info: ValidationInfo) -> object:
        name = cast(str, info.field_name)  # a field validator is always called for a field
        if isinstance(value, bool) and _is_number(cls.model_fields[name].annotation):
            raise ValueError("must be a number, not true/false")
        return value


def _is_number(annotation: object) -> bool:
    """int, float, or either with None."""
    return annotation in (int, float) or any(arg in (int, float) for arg in get_args(annotation))


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")  # what the trainer extracts (training/data.py)
_CAPTION_EXTENSION = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


class DatasetSpec(_Schema):
    # A folder of images with same-named .txt captions (kohya convention), an http(s) URL of a .zip/.tar(.gz)
    # of such a folder, or a Hugging Face dataset id ("owner/name", optionally "hf://owner/name"). Where a folder
    # may be (on the volume, or on the machine that runs `pulumi up`) is the stack's rule (infra/config.py).
    source: str = Field(min_length=1, max_length=MAX_URL_CHARS)
    image_column: str = Field(default="image", max_length=MAX_ID_CHARS)  # Hugging Face datasets only
    caption_column: str = Field(default="text", max_length=MAX_ID_CHARS)  # Hugging Face datasets only
    caption_extension: str = Field(default=".txt", max_length=MAX_WORD_CHARS)
    repeats: int = Field(default=1, ge=1, le=1000)
    default_caption: str = Field(default="", max_length=MAX_TEXT_CHARS)  # for images without a caption file

    @field_validator("source")
    @classmethod
    def _readable_source(cls, value: str) -> str:
        # imported here: contract.dataset imports this module
        from contract.dataset import DatasetError, classify_source, redacted_source

        try:
            kind = classify_source(value)
        except DatasetError as error:  # its message starts with the key and the value: the caller names both
            raise ValueError(str(error).removeprefix(f"train.dataset.source {redacted_source(value)!r}: ")) from None
        if kind == "url":
            path = urlsplit(value).path
            if not path.lower().endswith(ARCHIVE_SUFFIXES):
                raise ValueError(
                    "a URL must name the archive file itself (its path ending in " + ", ".join(ARCHIVE_SUFFIXES)
                    + "), like https://example.com/datasets/my-style.zip; a web page or a bare host is not a dataset"
                )
        return value

    @field_validator("caption_extension")
    @classmethod
    def _simple_extension(cls, value: str) -> str:
        if not _CAPTION_EXTENSION.match(value):
            raise ValueError("must be a dot and 1 to 10 letters or digits, like '.txt' or '.caption'")
        return value


def default_resolution(family: str, base_model: str) -> int:
    """A spec's resolution when it names none: the base model's native size (its family's, or its variant's: SD 2.1
    at 768), so an SD 1.5 stack does not train (and sample) at four times its pixel count."""
    return facts_for(family, base_model).native_resolution


MAX_MODE_SCALE = 2 / (math.pi - 2)  # the SD 3 paper's bound on the mode density's heavy-tails scale


class TrainSpec(_Schema):
    family: Family
    base_model: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="Hugging Face model id or a local path")
    revision: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    dataset: DatasetSpec
    trigger_word: str | None = Field(default=None, max_length=MAX_WORD_CHARS)
    resolution: int = Field(default=1024, ge=256, le=2048)  # left out: default_resolution (_defaults_from_the_run)
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
    # flow-matching families only (None: the family's default, FamilyFacts.flow_matching): the timestep density
    # and loss weighting of diffusers' SD 3 / FLUX LoRA examples
    weighting_scheme: WeightingScheme | None = None
    logit_mean: float | None = Field(default=None, ge=-10, le=10)  # logit_normal: the normal's mean
    logit_std: float | None = Field(default=None, gt=0, le=10)  # logit_normal: the normal's standard deviation
    # mode: the SD 3 paper's heavy-tails scale s, a density on [0, 1] for -1 <= s <= 2 / (pi - 2) (Esser et al.
    # 2024, eq. 20)
    mode_scale: float | None = None
    precondition_outputs: bool | None = None
    checkpoint_every: int = Field(default=250, ge=1)  # left out: at most the run's length (_defaults_from_the_run)
    keep_checkpoints: int = Field(default=2, ge=1, le=100)
    sample_prompts: list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]] = Field(default_factory=list, max_length=16)
    sample_every: int | None = Field(default=None, ge=1)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    wandb_project: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    hf_repo: str | None = Field(default=None, max_length=MAX_ID_CHARS, pattern=r"^[\w.-]+/[\w.-]+$")

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_the_run(cls, data: object) -> object:
        """Left-out keys whose default depends on others: resolution on the base model, checkpointEvery on steps (a
        short run still checkpoints once). Unusable inputs leave the plain defaults; their own errors are reported."""
        if not isinstance(data, dict):
            return data

        def given(name: str) -> object:
            return data.get(to_camel(name), data.get(name))

        filled = dict(data)
        family, base_model, steps = given("family"), given("base_model"), given("steps")
        if given("resolution") is None and family in FAMILY_NAMES and isinstance(base_model, str):
            filled["resolution"] = default_resolution(family, base_model)
        if given("checkpoint_every") is None and type(steps) is int and steps >= 1:
            filled["checkpointEvery"] = min(250, steps)
        return filled

    @field_validator("mode_scale")
    @classmethod
    def _mode_scale_keeps_a_density(cls, value: float | None) -> float | None:
        if value is not None and not -1 <= value <= MAX_MODE_SCALE:
            raise ValueError(f"must be between -1 and 2/(pi-2) = {MAX_MODE_SCALE:.3f} (got {value:g}): beyond, the "
                             "mode density leaves [0, 1]")
        return value

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
        size = len(self.to_env_json().encode())
        if size > MAX_SPEC_ENV_BYTES:
            raise ValueError(
                f"the spec takes {size} bytes as the pod's ${ENV_SPEC}; at most {MAX_SPEC_ENV_BYTES} fit the container's "
                "environment: shorten samplePrompts, defaultCaption or dataset.source"
            )
        return self

    @model_validator(mode="after")
    def _base_model_of_the_family(self) -> TrainSpec:
        # SD 1.x and 2.x share every pipeline class: trained under the wrong family, a run would go through with
        # the other family's resolution, memory figures and kohya labels
        owner = family_of_base_model(self.base_model)
        if owner is not None and owner.name != self.family:
            raise ValueError(f"{self.base_model} is a base model of family {owner.name}, not {self.family}: "
                             f"set family: {owner.name}")
        return self

    @model_validator(mode="after")
    def _intervals_within_the_run(self) -> TrainSpec:
        # an interval longer than the run never fires: no checkpoint to resume from, no sample to look at
        for key, every in (("checkpointEvery", self.checkpoint_every), ("sampleEvery", self.sample_every)):
            if every is not None and every > self.steps:
                raise ValueError(f"{key} ({every}) is larger than steps ({self.steps}): it would never happen; "
                                 f"set it to at most {self.steps}")
        return self

    @model_validator(mode="after")
    def _ddpm_only_keys(self) -> TrainSpec:
        # both act on DDPM noise; a flow-matching trainer would silently ignore or misapply them
        facts = facts_for(self.family)
        if facts.objective != "flow_matching":
            return self
        refused = [
            f"{key} ({reason})" for key, is_set, reason in (
                ("minSnrGamma", self.min_snr_gamma is not None, "min-SNR weighting needs a DDPM schedule's SNR"),
                ("noiseOffset", self.noise_offset > 0, "the flow-matching reference trainers add no offset noise"),
            ) if is_set
        ]
        if refused:
            raise ValueError(f"not supported for {facts.name}, a flow-matching model: {'; '.join(refused)}; "
                             "remove the key")
        return self

    @model_validator(mode="after")
    def _flow_matching_only_keys(self) -> TrainSpec:
        # a DDPM trainer draws uniform timesteps and weights by Min-SNR: it would silently ignore these
        facts = facts_for(self.family)
        if facts.objective == "flow_matching":
            return self
        refused = [key for key, value in (
            ("weightingScheme", self.weighting_scheme), ("logitMean", self.logit_mean), ("logitStd", self.logit_std),
            ("modeScale", self.mode_scale), ("preconditionOutputs", self.precondition_outputs),
        ) if value is not None]  # fmt: skip
        if refused:
            raise ValueError(
                f"{', '.join(refused)}: only for flow-matching families "
                f"({', '.join(name for name in FAMILY_NAMES if facts_for(name).objective == 'flow_matching')}); "
                f"{facts.name} is a DDPM model, whose timestep weighting is minSnrGamma; remove the key"
            )
        return self

    @property
    def flow_matching(self) -> FlowMatchingDefaults:
        """The timestep density and loss weighting a flow-matching run trains with: the keys the stack sets,
        the family's defaults for the others."""
        defaults = facts_for(self.family).flow_matching
        if defaults is None:
            raise ValueError(f"{self.family} is not a flow-matching family")
        return FlowMatchingDefaults(
            weighting_scheme=defaults.weighting_scheme if self.weighting_scheme is None else self.weighting_scheme,
            logit_mean=defaults.logit_mean if self.logit_mean is None else self.logit_mean,
            logit_std=defaults.logit_std if self.logit_std is None else self.logit_std,
            mode_scale=defaults.mode_scale if self.mode_scale is None else self.mode_scale,
            precondition_outputs=(
                defaults.precondition_outputs if self.precondition_outputs is None else self.precondition_outputs
            ),
        )

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)

    def to_env_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """Short content hash: a changed spec is a new run (its own directory on the volume). A dataset URL counts
        without its credentials: a fresh signature is the same run, in infra and in the pod alike. Settings left
        unset (None) are not hashed, so a key a later lorastack adds, unset, keeps a running stack's run (and pod)."""
        dataset = self.dataset.model_copy(update={"source": redacted_source(self.dataset.source)})
        hashed = self.model_copy(update={"dataset": dataset}).model_dump(mode="json", by_alias=True, exclude_none=True)
        written = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(written.encode()).hexdigest()[:10]


MAX_HOURS = 168  # a week: longer is a typo or a forgotten pod, not a LoRA run
MAX_COST_USD = 10_000


class RunLimits(_Schema):
    """Every pod has a time and a money limit; the trainer stops its pod at either."""

    max_hours: float = Field(gt=0, le=MAX_HOURS)
    max_cost_usd: float = Field(gt=0, le=MAX_COST_USD)
    stall_minutes: float = Field(default=20, gt=0, le=24 * 60)  # no step for this long: the watchdog stops the pod
    # before the first step (model download, dataset preparation, latent caching) the watchdog allows this long
    setup_minutes: float = Field(default=60, gt=0, le=24 * 60)
    usd_per_hour: float = Field(default=0.0, ge=0)  # filled in by infra from the price of the chosen GPU
    # limits below the run's own estimate are refused (the run would stop before it ends) unless the stack says
    # they are meant: a trial run that should stop early, a GPU known to be faster than the estimate
    allow_below_estimate: bool = False

    @field_validator("max_hours", "max_cost_usd", mode="before")
    @classmethod
    def _finite_budget(cls, value: object, info: ValidationInfo) -> object:
        # `.inf` / `.nan` in YAML: a limit that never stops a pod; said with the cap, not as a bare "finite number"
        if isinstance(value, float) and not math.isfinite(value):
            cap = f"{MAX_HOURS} hours" if info.field_name == "max_hours" else f"${MAX_COST_USD:,}"
            raise ValueError(f"must be a finite number, at most {cap}: an endless limit never stops the pod")
        return value


class SpecError(ValueError):
    """Invalid configuration; `problems` holds one line per bad key, each naming file, key, value and rule."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _show(value: object) -> str:
    from contract.dataset import redacted_source  # imported here: contract.dataset imports this module

    # a URL's credentials (user:password@, a signed query) never reach a message
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(redacted_source(value))
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


def spec_from_environment(environ: Mapping[str, str] | None = None) -> TrainSpec:
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
