"""Stack files: reading `stacks/Pulumi.<stack>.yaml` (or the config Pulumi resolved) into a validated StackConfig.

The same `parse_stack()` validates offline (`make check`, no Pulumi CLI, no credentials) and inside the Pulumi
program, so a bad value fails on a laptop before anything is billed. Every error line names the stack file, the key,
the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from contract.spec import SpecError, describe_errors
from infra.config import NAMESPACE, StackConfig
from infra.credentials import SECRETS
from infra.paths import STACKS_DIR



class StackError(SpecError):
    pass


def stack_file(stack: str) -> Path:
    return STACKS_DIR / f"Pulumi.{stack}.yaml"


def parse_stack(raw: dict[str, object], source: str) -> StackConfig:
    """Validate the `lorastack:*` entries of a stack file; every problem at once, each naming source and key."""
    entries: dict[str, object] = {}
    problems: list[str] = []
    for key, value in raw.items():
        namespace, _, name = key.partition(":")
        if namespace != NAMESPACE or not name:
            continue  # other providers' config (aws:region, ...) is not ours to judge
        if name in SECRETS:
            if not (isinstance(value, dict) and "secure" in value):
                problems.append(
                    f"{source}: {key}: a secret stored in plain text; run `pulumi config set --secret {name} ...` "
                    f"(or export {SECRETS[name]}) and remove the plain value"
                )
            continue
        entries[name] = value
    try:
        config = StackConfig.model_validate(entries)
    except ValidationError as error:
        problems += [line.replace(f"{NAMESPACE}:.", f"{NAMESPACE}:") for line in describe_errors(error, source, NAMESPACE + ":")]
        raise StackError(problems) from None
    if problems:
        raise StackError(problems)
    return config


def load_stack_file(path: Path) -> StackConfig:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise StackError([f"{path}: not valid YAML ({error})"]) from None
    except FileNotFoundError:
        raise StackError([f"{path}: no such stack file (stacks are stacks/Pulumi.<name>.yaml)"]) from None
    return parse_stack(document.get("config") or {}, _display(path))


def load_stack(stack: str) -> StackConfig:
    return load_stack_file(stack_file(stack))


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_from_pulumi(stack: str) -> StackConfig:
    """Inside the Pulumi program: the same validation over the stack's config as Pulumi resolved it."""
    import pulumi

    config = pulumi.Config(NAMESPACE)
    raw: dict[str, object] = {}
    for field in StackConfig.model_fields.values():
        try:
            value = config.get_object(field.alias)
        except pulumi.ConfigTypeError:  # the CLI hands plain scalars (provider: runpod) over as bare text
            value = config.get(field.alias)
        if value is not None:
            raw[f"{NAMESPACE}:{field.alias}"] = value
    return parse_stack(raw, _display(stack_file(stack)))
