"""Replicate's guardrails for the policy pack (policy/): models are private and deployments scale to zero unless
the pack's config allows otherwise."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
)

from policy.resources import config_value, is_dynamic


def _first(props: Mapping[str, Any], *names: str) -> Any:
    return next((props[name] for name in names if name in props), None)


def is_replicate_model(args: ResourceValidationArgs) -> bool:
    props = set(args.props)
    return is_dynamic(args.resource_type) and "visibility" in props and "owner" in props


def is_replicate_deployment(args: ResourceValidationArgs) -> bool:
    props = set(args.props)
    return is_dynamic(args.resource_type) and bool({"minInstances", "min_instances"} & props) and bool(
        {"maxInstances", "max_instances"} & props)



def validate_private_models(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if is_replicate_model(args) and args.props["visibility"] == "public" and not config_value(args, "allowPublicModels", False):
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
    if warm and not config_value(args, "allowWarmDeployments", False):
        report_violation(
            f"deployment {args.props.get('name')!r} keeps {minimum:g} instance(s) running (min instances > 0), billed "
            "around the clock. Set minInstances: 0, or allowWarmDeployments: true in the policy pack's config"
        )


POLICIES = [
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
]
