"""The local backend's guardrails for the policy pack (policy/): every container carries a time limit, the
reaper's mark and a pinned image. Its money limit may be 0 $/h (your own GPU bills nothing by the hour)."""

from __future__ import annotations

import json

from pulumi_policy import EnforcementLevel, ReportViolation, ResourceValidationArgs, ResourceValidationPolicy

from contract.spec import ENV_LIMITS, ENV_MANAGED
from infra.runpod_backend.policies import image_problem
from policy.resources import is_dynamic


def is_local_container(args: ResourceValidationArgs) -> bool:
    return is_dynamic(args.resource_type) and {"image", "folder", "env", "gpus"} <= set(args.props)


def validate_container(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if not is_local_container(args):
        return
    name, env = args.props.get("name"), args.props.get("env") or {}
    problem = image_problem(args.props.get("image"))
    if problem:
        report_violation(problem)
    if env.get(ENV_MANAGED) != "1":
        report_violation(f"container {name!r} lacks {ENV_MANAGED}=1: the reaper would not stop it at its limits")
    try:
        limits = json.loads(env.get(ENV_LIMITS) or "")
    except (json.JSONDecodeError, TypeError):
        limits = None
    max_hours = limits.get("maxHours") if isinstance(limits, dict) else None
    if not isinstance(max_hours, (int, float)) or max_hours <= 0:
        report_violation(f"container {name!r} has no positive {ENV_LIMITS}.maxHours: every run needs a time limit")


POLICIES = [
    ResourceValidationPolicy(
        name="local-container-limits-and-pinned-image",
        description="Local containers carry a time limit and the reaper's mark, and run a pinned image.",
        validate=validate_container,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
]
