"""How a Vast.ai instance of ours is recognised (without Pulumi: the provider, `make status` and the reaper share it)."""

from __future__ import annotations

from contract.spec import ENV_MANAGED


def extra_env(instance: dict) -> dict[str, str]:
    """The instance's env: the raw API has a list of [name, value] pairs (vast-cli makes it a dict)."""
    value = instance.get("extra_env") or []
    return dict(value) if isinstance(value, list) else dict(value)


def is_ours(instance: dict) -> bool:
    """Carries the reaper's mark, LORASTACK_MANAGED=1 (the label `lorastack-<stack>` is checked by the caller)."""
    return extra_env(instance).get(ENV_MANAGED) == "1"
