"""Names lorastack gives what it creates: one place, read by infra (providers, reaper, policy) and tests."""

from __future__ import annotations

from contract.spec import ENV_MANAGED, TrainSpec

NAME_PREFIX = "lorastack-"  # every pod and volume lorastack creates; with LORASTACK_MANAGED=1 it marks it for the reaper
MANAGED_LABEL = {ENV_MANAGED: "1"}


def run_id(stack: str, spec: TrainSpec) -> str:
    """A run is a stack plus a spec: a changed spec trains into a fresh directory on the volume."""
    return f"{stack}-{spec.fingerprint()}"


def pod_name(stack: str) -> str:
    """Every lorastack pod's name starts with `lorastack-`: with LORASTACK_MANAGED=1 it marks it for the reaper."""
    return f"{NAME_PREFIX}{stack}"
