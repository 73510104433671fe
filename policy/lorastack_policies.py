"""lorastack's guardrails as Pulumi policies: `pulumi preview --policy-pack policy/` runs them on every resource.

Every lorastack provider is a Python dynamic provider, so resource types all start with
`pulumi-python:dynamic` (`pulumi-python:dynamic/runpod:Pod` where the class names a module, plain
`pulumi-python:dynamic:Resource` where it does not). A resource is therefore recognised by its inputs, the
ones infra/runpod_backend/pod.py, infra/runpod_backend/volume.py and infra/replicate_backend/ declare.

Secrets: in `validate`, the Python policy SDK hands over secret inputs already unwrapped, so a validation
cannot tell a secret from a plain value. Only `remediate` sees the secret markers; the secrets policy is
therefore a remediation: it turns every plain token it finds into a secret before it reaches the state.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    Secret,
)

STACKS_DIR = Path(__file__).resolve().parent.parent / "stacks"
POD_NAME_PREFIX = "lorastack-"  # contract.naming.NAME_PREFIX; volumes are named the same way
ENV_LIMITS, ENV_STACK, ENV_MANAGED = "LORASTACK_LIMITS", "LORASTACK_STACK", "LORASTACK_MANAGED"
SECRET_ENV_NAMES = frozenset({"HF_TOKEN", "WANDB_API_KEY", "RUNPOD_API_KEY", "REPLICATE_API_TOKEN"})
# Input names that hold a credential: hfToken, hf_token, wandb_api_key, apiKey, replicateApiToken, ...
_SECRET_INPUT = re.compile(r"(token|api_?key|secret|password)$", re.IGNORECASE)
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")

DEFAULT_MAX_HOURS_PER_POD = 24.0
DEFAULT_MAX_COST_USD_PER_POD = 100.0


# --- recognising resources --------------------------------------------------------------------------------------


def is_dynamic(resource_type: str) -> bool:
    return resource_type.startswith("pulumi-python:dynamic")


def is_pod(args: ResourceValidationArgs) -> bool:
    return is_dynamic(args.resource_type) and {"image", "gpuTypeId", "env"} <= set(args.props)


def is_network_volume(args: ResourceValidationArgs) -> bool:
    return is_dynamic(args.resource_type) and {"sizeGb", "dataCenter"} <= set(args.props)


def _first(props: Mapping[str, Any], *names: str) -> Any:
    return next((props[name] for name in names if name in props), None)


def is_replicate_model(args: ResourceValidationArgs) -> bool:
    props = set(args.props)
    return is_dynamic(args.resource_type) and "visibility" in props and "owner" in props


def is_replicate_deployment(args: ResourceValidationArgs) -> bool:
    props = set(args.props)
    return is_dynamic(args.resource_type) and bool({"minInstances", "min_instances"} & props) and bool(
        {"maxInstances", "max_instances"} & props)


def stack_of(args: ResourceValidationArgs) -> str | None:
    """The stack a lorastack resource belongs to: the pod's LORASTACK_STACK, or the name lorastack-<stack>."""
    env = args.props.get("env") if "env" in args.props else None
    if isinstance(env, Mapping) and env.get(ENV_STACK):
        return str(env[ENV_STACK])
    name = args.props.get("name") if "name" in args.props else None
    if isinstance(name, str) and name.startswith(POD_NAME_PREFIX):
        return name[len(POD_NAME_PREFIX):]
    return None


def stack_file_entries(stack: str | None, stacks_dir: Path = STACKS_DIR) -> dict[str, Any] | None:
    """The `lorastack:*` entries of stacks/Pulumi.<stack>.yaml as written (no defaults filled in)."""
    if not stack:
        return None
    try:
        document = yaml.safe_load((stacks_dir / f"Pulumi.{stack}.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return {key.partition(":")[2]: value for key, value in (document.get("config") or {}).items()
            if key.startswith("lorastack:")}


def _config(args: ResourceValidationArgs, key: str, default: Any) -> Any:
    return (args.get_config() or {}).get(key, default)


# --- pods: limits and pinned images -----------------------------------------------------------------------------


def validate_pod_limits(args: ResourceValidationArgs, report_violation: ReportViolation,
                        stacks_dir: Path = STACKS_DIR) -> None:
    if not is_pod(args):
        return
    env = args.props["env"] or {}
    name = args.props.get("name")
    if env.get(ENV_MANAGED) != "1" or not str(name).startswith(POD_NAME_PREFIX):
        report_violation(
            f"pod {name!r} lacks the reaper's marks (name starting {POD_NAME_PREFIX!r} and {ENV_MANAGED}=1): "
            "nothing outside the pod would stop it at its limits"
        )
    raw = env.get(ENV_LIMITS)
    try:
        limits = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        limits = None
    if not isinstance(limits, dict):
        report_violation(f"pod {name!r} has no {ENV_LIMITS} (JSON with maxHours, maxCostUsd, usdPerHour): "
                         "every pod needs a time and a money limit")
        return
    max_hours, max_cost, usd_per_hour = limits.get("maxHours"), limits.get("maxCostUsd"), limits.get("usdPerHour")
    for key, value in (("maxHours", max_hours), ("maxCostUsd", max_cost)):
        if not isinstance(value, (int, float)) or value <= 0:
            report_violation(f"pod {name!r}: {ENV_LIMITS}.{key} must be a positive number (got {value!r})")
            return
    if not isinstance(usd_per_hour, (int, float)) or usd_per_hour <= 0:
        report_violation(f"pod {name!r}: {ENV_LIMITS}.usdPerHour is {usd_per_hour!r}: the trainer measures its money "
                         "limit with it, so with no price the money limit is never reached")
    ceiling_hours = _config(args, "maxHoursPerPod", DEFAULT_MAX_HOURS_PER_POD)
    ceiling_cost = _config(args, "maxCostUsdPerPod", DEFAULT_MAX_COST_USD_PER_POD)
    if max_hours > ceiling_hours:
        report_violation(f"pod {name!r}: maxHours {max_hours:g} exceeds the policy's maxHoursPerPod {ceiling_hours:g}")
    if max_cost > ceiling_cost:
        report_violation(f"pod {name!r}: maxCostUsd {max_cost:g} exceeds the policy's maxCostUsdPerPod {ceiling_cost:g}")
    stack = stack_of(args)
    budget = (stack_file_entries(stack, stacks_dir) or {}).get("limits")
    if isinstance(budget, Mapping):
        for key, value in (("maxHours", max_hours), ("maxCostUsd", max_cost)):
            allowed = budget.get(key)
            if isinstance(allowed, (int, float)) and value > allowed:
                report_violation(f"pod {name!r}: {ENV_LIMITS}.{key} {value:g} is above the stack's budget "
                                 f"(stacks/Pulumi.{stack}.yaml lorastack:limits.{key} = {allowed:g})")


def image_problem(image: object) -> str | None:
    """Why an image reference is not pinned, or None when it is (a version tag and/or a sha256 digest)."""
    if not isinstance(image, str) or not image:
        return f"image {image!r} is not a reference"
    digest = _DIGEST.search(image)
    reference = image[: digest.start()] if digest else image
    last = reference.rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else None
    if tag == "latest":
        return f"image {image!r} uses the mutable tag 'latest': pin a version (make image prints tag and digest)"
    if tag is None and not digest:
        return f"image {image!r} has no tag (Docker reads it as 'latest'): pin a version or @sha256 digest"
    return None


def validate_pinned_images(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if is_pod(args):
        problem = image_problem(args.props["image"])
        if problem:
            report_violation(problem)


# --- Replicate: private models, deployments scaled to zero -----------------------------------------------------


def validate_private_models(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if is_replicate_model(args) and args.props["visibility"] == "public" and not _config(args, "allowPublicModels", False):
        report_violation(
            f"Replicate model {args.props.get('owner')}/{args.props.get('name')} would be public: anyone could run "
            "the LoRA. Set visibility: private, or allowPublicModels: true in the policy pack's config"
        )


def validate_scale_to_zero(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if not is_replicate_deployment(args):
        return
    minimum = _first(args.props, "minInstances", "min_instances")
    # numbers reach a policy as floats (2 arrives as 2.0): any number above zero is a warm deployment
    warm = isinstance(minimum, (int, float)) and not isinstance(minimum, bool) and minimum > 0
    if warm and not _config(args, "allowWarmDeployments", False):
        report_violation(
            f"deployment {args.props.get('name')!r} keeps {minimum:g} instance(s) running (min instances > 0), billed "
            "around the clock. Set minInstances: 0, or allowWarmDeployments: true in the policy pack's config"
        )


# --- volumes: kept on destroy unless the stack says otherwise ---------------------------------------------------


def validate_volumes_kept(args: ResourceValidationArgs, report_violation: ReportViolation,
                          stacks_dir: Path = STACKS_DIR) -> None:
    if not is_network_volume(args):
        return
    keep = args.props.get("keepOnDestroy") if "keepOnDestroy" in args.props else None
    if keep is not False:
        return  # kept (the provider keeps a volume unless keepOnDestroy is false)
    if _config(args, "allowVolumeDeletion", False):
        return
    stack = stack_of(args)
    volume = ((stack_file_entries(stack, stacks_dir) or {}).get("runpod") or {}).get("volume")
    if isinstance(volume, Mapping) and volume.get("keepOnDestroy") is False:
        return  # the stack file says so in as many words
    report_violation(
        f"network volume {args.props.get('name')!r} would be deleted by `pulumi destroy`, with its datasets, model "
        f"cache and checkpoints, but stacks/Pulumi.{stack}.yaml does not set runpod.volume.keepOnDestroy: false"
    )


# --- secrets: never plain ---------------------------------------------------------------------------------------


def plain_secret_paths(raw: Any, path: tuple[Any, ...] = (), inside_secret: bool = False) -> list[tuple[Any, ...]]:
    """Paths of credentials stored in the clear, in raw inputs where secrets are `Secret` objects (as `remediate`
    receives them): env values named like HF_TOKEN, and inputs named like a token or key."""
    if isinstance(raw, Secret):
        return plain_secret_paths(raw.value, path, True)
    if isinstance(raw, Mapping):
        found = []
        for key, value in raw.items():
            if key == "__provider":
                continue  # the pickled provider: the RunPod providers keep their key out of it (volume.py)
            credential = key in SECRET_ENV_NAMES or bool(_SECRET_INPUT.search(str(key)))
            if credential and not inside_secret and isinstance(value, str) and value:
                found.append((*path, key))
            else:
                found += plain_secret_paths(value, (*path, key), inside_secret)
        return found
    if isinstance(raw, list):
        return [found for index, item in enumerate(raw) for found in plain_secret_paths(item, (*path, index), inside_secret)]
    return []


def _raw(props: Any) -> Any:
    """The dict behind the SDK's secret-preserving proxies (`props["__target"]`), Secret markers intact."""
    try:
        return props["__target"]
    except (KeyError, TypeError, IndexError):
        return props


def _unwrap_proxies(value: Any) -> Any:
    value = _raw(value)
    if isinstance(value, Secret):
        return Secret(_unwrap_proxies(value.value))
    if isinstance(value, Mapping):
        return {key: _unwrap_proxies(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unwrap_proxies(item) for item in value]
    return value


def remediate_plain_secrets(args: ResourceValidationArgs) -> dict[str, Any] | None:
    """The inputs with every plain credential made a secret, or None when there is none."""
    raw = _unwrap_proxies(args.props)
    paths = plain_secret_paths(raw)
    if not paths:
        return None
    for path in paths:
        holder = raw
        for key in path[:-1]:
            holder = holder[key].value if isinstance(holder[key], Secret) else holder[key]
        holder[path[-1]] = Secret(holder[path[-1]])
    return raw


# --- the pack ---------------------------------------------------------------------------------------------------


def _with_stacks_dir(validate: Callable[..., None]) -> Callable[[ResourceValidationArgs, ReportViolation], None]:
    return lambda args, report_violation: validate(args, report_violation, STACKS_DIR)


POLICIES = [
    ResourceValidationPolicy(
        name="pod-time-and-money-limits",
        description="Every pod carries a time and a money limit within the stack's budget, and the reaper's marks.",
        validate=_with_stacks_dir(validate_pod_limits),
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=PolicyConfigSchema(properties={
            "maxHoursPerPod": {"type": "number", "default": DEFAULT_MAX_HOURS_PER_POD},
            "maxCostUsdPerPod": {"type": "number", "default": DEFAULT_MAX_COST_USD_PER_POD},
        }),
    ),
    ResourceValidationPolicy(
        name="pinned-images",
        description="Pod images are pinned by version tag or digest: no 'latest', no tag-less reference.",
        validate=validate_pinned_images,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="private-replicate-models",
        description="Replicate models are private unless the pack's config sets allowPublicModels.",
        validate=validate_private_models,
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=PolicyConfigSchema(properties={"allowPublicModels": {"type": "boolean", "default": False}}),
    ),
    ResourceValidationPolicy(
        name="deployments-scale-to-zero",
        description="Replicate deployments keep minInstances at 0 unless the pack's config sets allowWarmDeployments.",
        validate=validate_scale_to_zero,
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=PolicyConfigSchema(properties={"allowWarmDeployments": {"type": "boolean", "default": False}}),
    ),
    ResourceValidationPolicy(
        name="volumes-kept-on-destroy",
        description="Network volumes survive `pulumi destroy` unless the stack file sets keepOnDestroy: false.",
        validate=_with_stacks_dir(validate_volumes_kept),
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=PolicyConfigSchema(properties={"allowVolumeDeletion": {"type": "boolean", "default": False}}),
    ),
    ResourceValidationPolicy(
        name="secrets-never-plain",
        description="Tokens and API keys (HF_TOKEN, WANDB_API_KEY, RUNPOD_API_KEY, *token/*apiKey inputs) are secrets.",
        remediate=remediate_plain_secrets,
        enforcement_level=EnforcementLevel.REMEDIATE,
    ),
]
