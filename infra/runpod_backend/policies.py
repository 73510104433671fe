"""RunPod's guardrails for the policy pack (policy/): every pod has limits, the reaper's marks and a pinned image;
a network volume survives `pulumi destroy` unless its stack file says otherwise."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import cast

from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
)

from contract.naming import NAME_PREFIX
from contract.spec import ENV_LIMITS, ENV_MANAGED
from infra.paths import STACKS_DIR
from policy.resources import config_value, is_dynamic, stack_file_entries, stack_of

_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
DEFAULT_MAX_HOURS_PER_POD = 24.0
DEFAULT_MAX_COST_USD_PER_POD = 100.0


def is_pod(args: ResourceValidationArgs) -> bool:
    return is_dynamic(args.resource_type) and {"image", "gpuTypeId", "env"} <= set(args.props)


def is_network_volume(args: ResourceValidationArgs) -> bool:
    return is_dynamic(args.resource_type) and {"sizeGb", "dataCenter"} <= set(args.props)



def validate_pod_limits(args: ResourceValidationArgs, report_violation: ReportViolation,
                        stacks_dir: Path = STACKS_DIR) -> None:
    if not is_pod(args):
        return
    env = args.props["env"] or {}
    name = args.props.get("name")
    if env.get(ENV_MANAGED) != "1" or not str(name).startswith(NAME_PREFIX):
        report_violation(
            f"pod {name!r} lacks the reaper's marks (name starting {NAME_PREFIX!r} and {ENV_MANAGED}=1): "
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
    max_hours, max_cost = cast(float, max_hours), cast(float, max_cost)  # both checked just above
    if not isinstance(usd_per_hour, (int, float)) or usd_per_hour <= 0:
        report_violation(f"pod {name!r}: {ENV_LIMITS}.usdPerHour is {usd_per_hour!r}: the trainer measures its money "
                         "limit with it, so with no price the money limit is never reached")
    ceiling_hours = config_value(args, "maxHoursPerPod", DEFAULT_MAX_HOURS_PER_POD)
    ceiling_cost = config_value(args, "maxCostUsdPerPod", DEFAULT_MAX_COST_USD_PER_POD)
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


def validate_volumes_kept(args: ResourceValidationArgs, report_violation: ReportViolation,
                          stacks_dir: Path = STACKS_DIR) -> None:
    if not is_network_volume(args):
        return
    keep = args.props.get("keepOnDestroy") if "keepOnDestroy" in args.props else None
    if keep is not False:
        return  # kept (the provider keeps a volume unless keepOnDestroy is false)
    if config_value(args, "allowVolumeDeletion", False):
        return
    stack = stack_of(args)
    volume = ((stack_file_entries(stack, stacks_dir) or {}).get("runpod") or {}).get("volume")
    if isinstance(volume, Mapping) and volume.get("keepOnDestroy") is False:
        return  # the stack file says so in as many words
    report_violation(
        f"network volume {args.props.get('name')!r} would be deleted by `pulumi destroy`, with its datasets, model "
        f"cache and checkpoints, but stacks/Pulumi.{stack}.yaml does not set runpod.volume.keepOnDestroy: false"
    )


POLICIES = [
    ResourceValidationPolicy(
        name="pod-time-and-money-limits",
        description="Every pod carries a time and a money limit within the stack's budget, and the reaper's marks.",
        validate=validate_pod_limits,
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
        name="volumes-kept-on-destroy",
        description="Network volumes survive `pulumi destroy` unless the stack file sets keepOnDestroy: false.",
        validate=validate_volumes_kept,
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=PolicyConfigSchema(properties={"allowVolumeDeletion": {"type": "boolean", "default": False}}),
    ),
]
