"""What every lorastack policy needs to know about a resource, whatever the backend: is it one of our dynamic
resources, which stack it belongs to, and what that stack's file says.

Every lorastack provider is a Python dynamic provider, so resource types all start with
`pulumi-python:dynamic` (`pulumi-python:dynamic/runpod:Pod` where the class names a module, plain
`pulumi-python:dynamic:Resource` where it does not). A resource is therefore recognised by its inputs, the
ones each backend's providers declare; each backend's policies (infra/<name>_backend/policies.py) do that.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pulumi_policy import ResourceValidationArgs

from contract.naming import NAME_PREFIX
from contract.spec import ENV_STACK
from infra.paths import STACKS_DIR


def is_dynamic(resource_type: str) -> bool:
    return resource_type.startswith("pulumi-python:dynamic")


def stack_of(args: ResourceValidationArgs) -> str | None:
    """The stack a lorastack resource belongs to: the pod's LORASTACK_STACK, or the name lorastack-<stack>."""
    env = args.props.get("env") if "env" in args.props else None
    if isinstance(env, Mapping) and env.get(ENV_STACK):
        return str(env[ENV_STACK])
    name = args.props.get("name") if "name" in args.props else None
    if isinstance(name, str) and name.startswith(NAME_PREFIX):
        return name[len(NAME_PREFIX):]
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


def config_value(args: ResourceValidationArgs, key: str, default: Any) -> Any:
    return (args.get_config() or {}).get(key, default)
