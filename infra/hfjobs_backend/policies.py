"""Hugging Face Jobs' guardrails for the policy pack (policy/): checkpoint repos are private and every job carries
a timeout, unless the pack's config allows otherwise."""

from __future__ import annotations

from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
)

from policy.resources import config_value, is_dynamic


def is_hub_repo(args: ResourceValidationArgs) -> bool:
    return is_dynamic(args.resource_type) and {"repoId", "private"} <= set(args.props)


def is_hf_job(args: ResourceValidationArgs) -> bool:
    return is_dynamic(args.resource_type) and {"flavor", "timeoutSeconds", "labels"} <= set(args.props)


def validate_private_repos(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    if is_hub_repo(args) and args.props["private"] is False and not config_value(args, "allowPublicRepos", False):
        report_violation(
            f"Hub repo {args.props.get('repoId')} would be public: anyone could download the checkpoints and the "
            "LoRA. Set checkpointRepo.private: true, or allowPublicRepos: true in the policy pack's config"
        )


def validate_job_timeout(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    timeout = args.props.get("timeoutSeconds") if is_hf_job(args) else None
    if is_hf_job(args) and not (isinstance(timeout, (int, float)) and timeout >= 60):
        report_violation(
            f"Hugging Face job has no usable timeoutSeconds ({timeout!r}): without one the server stops it after 30 "
            "minutes, and nothing bounds what it bills. The stack's limits set it"
        )


POLICIES = [
    ResourceValidationPolicy(
        name="private-hub-repos",
        description="Checkpoint repos on the Hub are private unless the pack's config sets allowPublicRepos.",
        validate=validate_private_repos,
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=PolicyConfigSchema(properties={"allowPublicRepos": {"type": "boolean", "default": False}}),
    ),
    ResourceValidationPolicy(
        name="hf-jobs-have-timeouts",
        description="Every Hugging Face job carries a timeout derived from the stack's limits.",
        validate=validate_job_timeout,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
]
