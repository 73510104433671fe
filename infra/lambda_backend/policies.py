"""Lambda Cloud's guardrails for the policy pack (policy/): every instance carries the reaper's tags with a time
and a money limit within the policy's ceilings and the stack's budget; a filesystem survives `pulumi destroy`
unless its stack file says otherwise. (The image is pinned by the stack's schema; here it sits inside the secret
user data, which a policy does not see.)"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
)

from contract.naming import NAME_PREFIX
from infra.lambda_backend.reap import TAG_MANAGED, TAG_MAX_COST, TAG_MAX_HOURS, TAG_STACK
from infra.paths import STACKS_DIR
from infra.runpod_backend.policies import DEFAULT_MAX_COST_USD_PER_POD, DEFAULT_MAX_HOURS_PER_POD
from policy.resources import config_value, is_dynamic, stack_file_entries


def is_instance(args: ResourceValidationArgs) -> bool:
    return is_dynamic(args.resource_type) and {"instanceTypeName", "regionName", "userData"} <= set(args.props)


def is_filesystem(args: ResourceValidationArgs) -> bool:
    return is_dynamic(args.resource_type) and {"region", "keepOnDestroy"} <= set(args.props) and "sizeGb" not in args.props


def _tags(args: ResourceValidationArgs) -> dict[Any, Any]:
    """The instance's tags as the stack wrote them: keys and values are not known to be strings."""
    tags = args.props.get("tags") if "tags" in args.props else None
    return {tag.get("key"): tag.get("value") for tag in tags or [] if isinstance(tag, Mapping)}


def validate_instance_limits(args: ResourceValidationArgs, report_violation: ReportViolation,
                             stacks_dir: Path = STACKS_DIR) -> None:
    if not is_instance(args):
        return
    name, tags = args.props.get("name"), _tags(args)
    if tags.get(TAG_MANAGED) != "1" or not str(name).startswith(NAME_PREFIX) or not tags.get(TAG_STACK):
        report_violation(f"instance {name!r} lacks the reaper's marks (name starting {NAME_PREFIX!r}, tags "
                         f"{TAG_MANAGED}=1 and {TAG_STACK}): nothing outside it would terminate it at its limits")
    limits = {}
    for key, tag in (("maxHours", TAG_MAX_HOURS), ("maxCostUsd", TAG_MAX_COST)):
        try:
            limits[key] = float(tags[tag])
        except (KeyError, TypeError, ValueError):
            report_violation(f"instance {name!r} has no readable tag {tag}: every instance needs a time and a money limit")
            return
    ceilings = {"maxHours": config_value(args, "maxHoursPerInstance", DEFAULT_MAX_HOURS_PER_POD),
                "maxCostUsd": config_value(args, "maxCostUsdPerInstance", DEFAULT_MAX_COST_USD_PER_POD)}
    budget = (stack_file_entries(tags.get(TAG_STACK), stacks_dir) or {}).get("limits")
    for key, value in limits.items():
        if value > ceilings[key]:
            report_violation(f"instance {name!r}: {key} {value:g} exceeds the policy's ceiling {ceilings[key]:g}")
        allowed = budget.get(key) if isinstance(budget, Mapping) else None
        if isinstance(allowed, (int, float)) and value > allowed:
            report_violation(f"instance {name!r}: {key} {value:g} is above the stack's budget "
                             f"(stacks/Pulumi.{tags.get(TAG_STACK)}.yaml lorastack:limits.{key} = {allowed:g})")


def validate_filesystems_kept(args: ResourceValidationArgs, report_violation: ReportViolation,
                              stacks_dir: Path = STACKS_DIR) -> None:
    if not is_filesystem(args) or args.props.get("keepOnDestroy") is not False:
        return
    if config_value(args, "allowFilesystemDeletion", False):
        return
    name = str(args.props.get("name"))
    stack = name.removeprefix(NAME_PREFIX) if name.startswith(NAME_PREFIX) else None
    filesystem = ((stack_file_entries(stack, stacks_dir) or {}).get("lambda") or {}).get("filesystem")
    if isinstance(filesystem, Mapping) and filesystem.get("keepOnDestroy") is False:
        return  # the stack file says so in as many words
    report_violation(f"filesystem {name!r} would be deleted by `pulumi destroy`, with its datasets, model cache and "
                     f"checkpoints, but stacks/Pulumi.{stack}.yaml does not set lambda.filesystem.keepOnDestroy: false")


POLICIES = [
    ResourceValidationPolicy(
        name="lambda-instance-time-and-money-limits",
        description="Every Lambda instance carries the reaper's tags with a time and a money limit within the budget.",
        validate=validate_instance_limits,
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=PolicyConfigSchema(properties={
            "maxHoursPerInstance": {"type": "number", "default": DEFAULT_MAX_HOURS_PER_POD},
            "maxCostUsdPerInstance": {"type": "number", "default": DEFAULT_MAX_COST_USD_PER_POD},
        }),
    ),
    ResourceValidationPolicy(
        name="lambda-filesystems-kept-on-destroy",
        description="Lambda filesystems survive `pulumi destroy` unless the stack file sets keepOnDestroy: false.",
        validate=validate_filesystems_kept,
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=PolicyConfigSchema(properties={"allowFilesystemDeletion": {"type": "boolean", "default": False}}),
    ),
]
