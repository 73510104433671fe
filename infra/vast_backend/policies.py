"""Vast.ai's guardrails for the policy pack (policy/): every instance carries the reaper's marks, a time and a
money limit within the stack's budget, and a pinned image."""

from __future__ import annotations

import json
from collections.abc import Mapping

from pulumi_policy import EnforcementLevel, ReportViolation, ResourceValidationArgs, ResourceValidationPolicy

from contract.naming import NAME_PREFIX
from contract.spec import ENV_LIMITS, ENV_MANAGED
from infra.paths import STACKS_DIR
from infra.runpod_backend.policies import image_problem
from policy.resources import is_dynamic, stack_file_entries, stack_of


def is_instance(args: ResourceValidationArgs) -> bool:
    return is_dynamic(args.resource_type) and {"image", "gpuName", "maxUsdPerHour", "env"} <= set(args.props)


def validate_instance(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if not is_instance(args):
        return
    label, env = args.props.get("label"), args.props.get("env") or {}
    problem = image_problem(args.props["image"])
    if problem:
        report_violation(problem)
    if env.get(ENV_MANAGED) != "1" or not str(label).startswith(NAME_PREFIX):
        report_violation(f"instance {label!r} lacks the reaper's marks (label starting {NAME_PREFIX!r} and "
                         f"{ENV_MANAGED}=1): nothing outside it would destroy it at its limits")
    try:
        limits = json.loads(env.get(ENV_LIMITS) or "")
    except (TypeError, json.JSONDecodeError):
        limits = None
    if not isinstance(limits, dict) or not all(isinstance(limits.get(key), (int, float)) and limits[key] > 0
                                               for key in ("maxHours", "maxCostUsd", "usdPerHour")):
        report_violation(f"instance {label!r} has no valid {ENV_LIMITS} (positive maxHours, maxCostUsd, usdPerHour)")
        return
    stack = stack_of(args) or (str(label)[len(NAME_PREFIX):] if str(label).startswith(NAME_PREFIX) else None)
    budget = (stack_file_entries(stack, STACKS_DIR) or {}).get("limits")
    if isinstance(budget, Mapping):
        for key in ("maxHours", "maxCostUsd"):
            allowed = budget.get(key)
            if isinstance(allowed, (int, float)) and limits[key] > allowed:
                report_violation(f"instance {label!r}: {ENV_LIMITS}.{key} {limits[key]:g} is above the stack's budget "
                                 f"(lorastack:limits.{key} = {allowed:g})")


POLICIES = [
    ResourceValidationPolicy(
        name="vast-instance-limits-and-image",
        description="Every Vast.ai instance has the reaper's marks, limits within the stack's budget, a pinned image.",
        validate=validate_instance,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
]
