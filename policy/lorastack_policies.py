"""lorastack's guardrails as Pulumi policies: `pulumi preview --policy-pack policy/` runs them on every resource.

Each backend brings its own policies (infra/<name>_backend/policies.py, found through the registry
infra.backends), since only it knows its resources' inputs; policy/resources.py holds what they share. This
module adds the one policy every backend's resources need: secrets never plain.

Secrets: in `validate`, the Python policy SDK hands over secret inputs already unwrapped, so a validation
cannot tell a secret from a plain value. Only `remediate` sees the secret markers; the secrets policy is
therefore a remediation: it turns every plain token it finds into a secret before it reaches the state.

The pack runs on the project's .venv (PulumiPolicy.yaml), where `make setup` installed this project, so the
project's packages (contract, infra) import here as in the program.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import Any

from pulumi_policy import EnforcementLevel, ResourceValidationArgs, ResourceValidationPolicy, Secret

from infra import backends

SECRET_ENV_NAMES = frozenset({"HF_TOKEN", "WANDB_API_KEY", "RUNPOD_API_KEY", "REPLICATE_API_TOKEN"})
# Input names that hold a credential: hfToken, hf_token, wandb_api_key, apiKey, replicateApiToken, ...
_SECRET_INPUT = re.compile(r"(token|api_?key|secret|password)$", re.IGNORECASE)


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


SECRETS_POLICY = ResourceValidationPolicy(
    name="secrets-never-plain",
    description="Tokens and API keys (HF_TOKEN, WANDB_API_KEY, RUNPOD_API_KEY, *token/*apiKey inputs) are secrets.",
    remediate=remediate_plain_secrets,
    enforcement_level=EnforcementLevel.REMEDIATE,
)

# every backend's policies, in the registry's order, then the secrets policy
POLICIES = [
    *(policy for name in backends.names() for policy in importlib.import_module(backends.policies_module(name)).POLICIES),
    SECRETS_POLICY,
]
