"""Stack files: reading `stacks/Pulumi.<stack>.yaml` (or the config Pulumi resolved) into a validated StackConfig.

The same `parse_stack()` validates offline (`make check`, no Pulumi CLI, no credentials) and inside the Pulumi
program, so a bad value fails on a laptop before anything is billed. Every error line names the stack file, the key,
the value and what is allowed, and one pass reports every problem: each section (train, runpod, limits, ...) is
validated on its own, so one section's errors do not hide another's; the cross-field rules run on what did validate,
and so does the memory fit (train against the GPU).

A stack file is read defensively: it is text anyone can edit, and `make check` must answer every malformed file with
one clear error instead of a traceback (no YAML aliases, no duplicate keys, bounded nesting, UTF-8 only).
"""

from __future__ import annotations

import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from contract.spec import RunLimits, SpecError, TrainSpec, describe_errors
from infra.backends import BACKEND_MODULES
from infra.config import NAMESPACE, ImageConfig, StackConfig
from infra.credentials import SECRETS
from infra.paths import STACKS_DIR

MAX_DEPTH = 32  # a stack file is a handful of levels deep; deeper is a mistake, or an attack on the parser


class StackError(SpecError):
    pass


def stack_file(stack: str) -> Path:
    return STACKS_DIR / f"Pulumi.{stack}.yaml"


# --- reading the YAML ---------------------------------------------------------------------------------------------


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a stack file must not hold."""


class _StackYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses what a stack file never needs and a parser must not be tricked by:
    aliases (a "billion laughs" expands a few hundred bytes into gigabytes), duplicate keys (YAML keeps the
    last one silently) and deep nesting (the composer recurses)."""

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(
                problem=f"YAML aliases (*{event.anchor}) are not allowed in a stack file; write the value out",
                problem_mark=event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(
                    problem=f"nested deeper than {MAX_DEPTH} levels", problem_mark=self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key ([a, b]: 1): the base class reports it
                break
            if first is not None:
                raise _Refused(
                    problem=f"duplicate key {key!r} (first at line {first.line + 1}); YAML would keep only the last",
                    problem_mark=key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_stack_document(path: Path) -> dict[object, object]:
    """The `config` mapping of a stack file, or StackError with one line saying what is wrong with the file."""
    shown = _display(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StackError([f"{shown}: no such stack file (stacks are stacks/Pulumi.<name>.yaml)"]) from None
    except OSError as error:
        raise StackError([f"{shown}: cannot be read ({error.strerror})"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        byte = f"0x{data[error.start]:02x}"
        raise StackError([f"{shown}: not UTF-8 text (byte {byte} on line {line}); save it as UTF-8"]) from None
    try:
        document = yaml.load(text, Loader=_StackYamlLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = "not a valid stack file" if isinstance(error, _Refused) else "not valid YAML"
        raise StackError([f"{shown}: {what}: {error.problem}{where}"]) from None
    except (yaml.YAMLError, RecursionError) as error:
        raise StackError([f"{shown}: not valid YAML ({type(error).__name__}: {error})"]) from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise StackError([f"{shown}: the file must be a mapping with a `config:` key, not a {_kind(document)}"])
    config = document.get("config")
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise StackError([f"{shown}: config: must be a mapping of `{NAMESPACE}:<key>: value` entries, "
                          f"not a {_kind(config)}"])
    return config


def load_stack_file(path: Path) -> StackConfig:
    return parse_stack(read_stack_document(path), _display(path))


def load_stack(stack: str) -> StackConfig:
    return load_stack_file(stack_file(stack))


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _kind(value: object) -> str:
    names = {list: "list", str: "text", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


# --- validating -------------------------------------------------------------------------------------------------


def parse_stack(raw: dict[object, object], source: str) -> StackConfig:
    """Validate the `lorastack:*` entries of a stack file; every problem at once, each naming source and key."""
    secrets, raw = _plain_secrets(raw)  # each secret's value is replaced: no message can quote it
    entries, problems = _our_entries(raw, source, {finding.path for finding in secrets})
    problems += _unused_backends(entries, source)
    try:
        config = StackConfig.model_validate(entries)
    except ValidationError as error:
        problems += _section_problems(entries, error, source) or _lines(error, source, f"{NAMESPACE}:", StackConfig)
    else:
        if not (problems or secrets):
            return config
    raise StackError(_with_secrets(problems, secrets, source))


def _our_entries(raw: dict[object, object], source: str, secret_keys: set[str]) -> tuple[dict[str, object], list[str]]:
    """The `lorastack:` entries by name; misspelt namespaces and names as problems (`secret_keys`, the keys holding a
    plain-text secret, are reported as that alone)."""
    fields = _aliases(StackConfig)
    entries: dict[str, object] = {}
    problems: list[str] = []
    for key, value in raw.items():
        if not isinstance(key, str):
            problems.append(f"{source}: config key {key!r}: keys are `{NAMESPACE}:<name>` text, not a {_kind(key)}")
            continue
        namespace, colon, name = key.partition(":")
        if namespace != NAMESPACE or not name:
            if not colon and key in fields + list(SECRETS):
                problems.append(f"{source}: {key}: write it as `{NAMESPACE}:{key}` (config keys carry the project name)")
            elif colon and difflib.get_close_matches(namespace, [NAMESPACE], n=1, cutoff=0.75):
                problems.append(f"{source}: {key}: unknown namespace {namespace!r}; did you mean `{NAMESPACE}:{name}`?")
            continue  # other providers' config (aws:region, ...) is not ours to judge
        if name in SECRETS or key in secret_keys:  # secrets are read apart from StackConfig (infra/credentials.py)
            continue
        if name not in fields:
            problems.append(f"{source}: {key}: unknown key; {_suggest(name, fields + list(SECRETS), NAMESPACE + ':')}")
            continue
        entries[name] = value
    return entries, problems


# --- plain-text secrets ------------------------------------------------------------------------------------------

# A key whose name says it holds a credential, however it is spelt (RunPodAPIKey, runpod_api_key, HF_TOKEN,
# aws:secretKey), compared without case and separators; `tokenizer` or `maxTokens` are not credentials.
_SECRET_NAME = re.compile(r"(token|apikey|secret|secretkey|accesskey|privatekey|password|passwd|passphrase|credentials?)$")
# Values shaped like the tokens vendors issue, under any key at all
_TOKEN_SHAPES = {
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    "RunPod API key": re.compile(r"\brpa_[A-Za-z0-9]{20,}"),
    "Replicate API token": re.compile(r"\br8_[A-Za-z0-9]{20,}"),
    "API secret key (sk-...)": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
}
_REDACTED = "<redacted>"


@dataclass(frozen=True)
class _PlainSecret:
    path: str  # the config key, dotted below the top level: `lorastack:train.hfToken`
    name: str  # its last part
    nested: bool
    kind: str | None  # the token shape its value has, or None when only its name says it is a secret


def _normalised(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _plain_secrets(raw: dict[object, object]) -> tuple[list[_PlainSecret], dict[object, object]]:
    """Every plain-text secret in a stack's config, in any namespace, at any depth: a key named like a credential
    with a text value (not Pulumi's encrypted `{secure: ...}`), or any text shaped like a vendor's token. And the
    config with each of those values replaced by a placeholder, to validate the rest without ever quoting one."""
    found: list[_PlainSecret] = []

    def visit(value: object, path: str, name: str, nested: bool) -> object:
        if isinstance(value, dict):
            if "secure" in value:
                return value
            return {key: visit(item, f"{path}.{key}", str(key), True) for key, item in value.items()}
        if isinstance(value, list):
            return [visit(item, f"{path}[{index}]", name, nested) for index, item in enumerate(value)]
        if isinstance(value, str) and value:
            kind = next((kind for kind, shape in _TOKEN_SHAPES.items() if shape.search(value)), None)
            if kind is not None or _SECRET_NAME.search(_normalised(name)):
                found.append(_PlainSecret(path, name, nested, kind))
                return _REDACTED
        return value

    cleaned = {
        key: visit(value, key, key.partition(":")[2] or key, False) if isinstance(key, str) else value
        for key, value in raw.items()
    }
    return found, cleaned


def _secret_problem(secret: _PlainSecret, source: str) -> str:
    what = f"holds a {secret.kind} in plain text" if secret.kind else "a secret stored in plain text"
    known = next((name for name in SECRETS if _normalised(name) == _normalised(secret.name)), None)
    namespace, colon, _ = secret.path.split(".", 1)[0].partition(":")
    if known is not None and (namespace == NAMESPACE or not colon):
        spelt = "" if secret.path == f"{NAMESPACE}:{known}" else f"lorastack reads it as the secret `{known}`: "
        fix = f"{spelt}run `pulumi config set --secret {known} ...` (or export {SECRETS[known]})"
    elif secret.nested:
        fix = f"run `pulumi config set --secret --path '{secret.path}' ...`"
    else:
        fix = f"run `pulumi config set --secret {secret.path} ...`"
    return f"{source}: {secret.path}: {what}; {fix} and remove the plain value"


def _with_secrets(problems: list[str], secrets: list[_PlainSecret], source: str) -> list[str]:
    """The secret findings first, then the other problems without their lines about a secret's key (one line per
    key: the rest would judge the placeholder)."""
    keys = tuple(f"{source}: {secret.path}{end}" for secret in secrets for end in (":", " ="))
    return [_secret_problem(secret, source) for secret in secrets] + [
        line for line in problems if not line.startswith(keys)
    ]


def _unused_backends(entries: dict[str, object], source: str) -> list[str]:
    """A backend section the provider does not use would be silently ignored: a stack that says `provider: runpod`
    and configures Replicate has a mistake in one of the two."""
    provider = entries.get("provider")
    if provider not in BACKEND_MODULES:
        return []
    return [
        f"{source}: {NAMESPACE}:{section}: this stack's provider is {provider}, so this section would be ignored; "
        f"remove it (or set {NAMESPACE}:provider: {section})"
        for section in sorted(set(BACKEND_MODULES) - {provider}) if section in entries
    ]


def _section_problems(entries: dict[str, object], whole: ValidationError, source: str) -> list[str]:
    """Each section validated alone, the cross-field rules on what validated, then the stack-wide rules
    (a backend section per provider, the memory fit) whenever their inputs validated."""
    problems: list[str] = []
    validated: dict[str, object] = {}
    dropped: set[str] = set()  # keys whose own value failed: a rule that names one of them is not judged
    for name, field in StackConfig.model_fields.items():
        alias = field.alias or name
        if alias not in entries:
            if field.is_required():
                problems.append(f"{source}: {NAMESPACE}:{alias}: required key is missing")
            continue
        value = entries[alias]
        if alias == "image" and isinstance(value, str):
            value = ImageConfig.from_reference(value)
        model = _model_of(field.annotation)
        if model is None or value is None:  # a scalar (provider, wait) or an explicit null: the whole stack's errors
            own = [line for line, item in zip(_lines(whole, source, f"{NAMESPACE}:", StackConfig), whole.errors(), strict=False)
                   if item["loc"][:1] == (alias,)]
            problems += own
            if not own:
                validated[alias] = value
            continue
        section, section_problems, section_dropped = _validate_section(model, value, source, f"{NAMESPACE}:{alias}")
        problems += section_problems
        dropped |= section_dropped
        if section is not None:
            validated[alias] = section
    provider = validated.get("provider")
    if provider in BACKEND_MODULES:
        backend = provider  # a backend's section is named after it
        if "train" in validated and (backend in validated or backend not in entries):
            problems += [
                line
                # the sections that validated are models (a section that is null is None)
                for line in _stack_rules(provider, typing.cast(BaseModel | None, validated.get(backend)),
                                         typing.cast(TrainSpec, validated["train"]), source,
                                         typing.cast(RunLimits | None, validated.get("limits")))
                if not _names_any(line, dropped)
            ]
    return problems


def _stack_rules(provider: str, backend: BaseModel | None, train: TrainSpec, source: str,
                 limits: RunLimits | None = None) -> list[str]:
    """StackConfig's own rules (backend present, memory fit, trainer family, limits vs the estimate) over the
    validated sections. They are called on an unvalidated StackConfig: validating one would run every section's
    rules again."""
    sections: dict[str, Any] = {provider: backend} if backend else {}
    candidate = StackConfig.model_construct(
        provider=provider, train=train, limits=limits or _PLACEHOLDER_LIMITS, **sections
    )
    lines = []
    for rule in StackConfig.__pydantic_decorators__.model_validators.values():
        if rule.info.mode == "after":
            try:
                rule.func(candidate)
            except ValueError as error:
                lines.append(f"{source}: {NAMESPACE}: {error}")
    return lines


def _validate_section(model: type[BaseModel], value: object, source: str, prefix: str):
    """(the section, or its valid part for the rules that follow; problems; keys whose values failed)."""
    try:
        return model.model_validate(value), [], set()
    except ValidationError as error:
        problems = _lines(error, source, prefix, model)
        failed_keys = {str(item["loc"][0]) for item in error.errors() if item["loc"]}
    if not isinstance(value, dict):
        return None, problems, set()
    fields_only = _without_rules(model)
    if not failed_keys:  # only the section's cross-field rules failed: its fields are sound for later rules
        try:
            return fields_only.model_validate(value), problems, set()
        except ValidationError:
            return None, problems, set()
    remaining = {key: item for key, item in value.items() if key not in failed_keys}
    try:
        model.model_validate(remaining)
    except ValidationError as error:  # the rules over what validated, unless they name a key that failed
        problems += [
            line for line in _lines(error, source, prefix, model)
            if _is_rule(line, prefix) and not _names_any(line, failed_keys)
        ]
    try:
        partial = fields_only.model_validate(remaining)
    except ValidationError:
        partial = None  # a required key failed: nothing to judge further
    return partial, problems, failed_keys


@functools.cache
def _without_rules(model: type[BaseModel]) -> type[BaseModel]:
    """A subclass that validates the fields (nested sections included) but not the model's own cross-field rules,
    so a section whose rules failed can still feed the stack-wide ones (a memory fit needs only the fields)."""
    overrides = {
        name: model_validator(mode="after")(lambda self: self)
        for name, info in model.__pydantic_decorators__.model_validators.items() if info.info.mode == "after"
    }
    return types.new_class(model.__name__, (model,), {}, lambda namespace: namespace.update(overrides))


def _lines(error: ValidationError, source: str, prefix: str, model: type[BaseModel]) -> list[str]:
    """describe_errors' lines, with the nearest valid key for an unknown one ("did you mean `stallMinutes`?")."""
    lines = describe_errors(error, source, prefix)
    for index, item in enumerate(error.errors()):
        if item["type"] == "extra_forbidden" and index < len(lines):
            *parents, unknown = [str(part) for part in item["loc"]]
            level = _model_at(model, parents)
            if level is not None:
                suggestion = "unknown key; " + _suggest(unknown, _aliases(level))
                lines[index] = lines[index].replace("unknown key (check its spelling)", suggestion)
    return [line.replace(f"{NAMESPACE}:.", f"{NAMESPACE}:") for line in lines]


def _suggest(unknown: str, allowed: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(unknown, allowed, n=1, cutoff=0.6)
    if close:
        return f"did you mean `{prefix}{close[0]}`?"
    return "allowed here: " + ", ".join(sorted(allowed))


def _aliases(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _model_of(annotation: object) -> type[BaseModel] | None:
    """The model in `Model`, `Model | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((model for arg in typing.get_args(annotation) if (model := _model_of(arg)) is not None), None)
    return None


def _model_at(model: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    for part in path:
        field = next((f for name, f in model.model_fields.items() if part in (name, f.alias)), None)
        inner = _model_of(field.annotation) if field is not None else None
        if inner is None:
            return None
        model = inner
    return model


def _is_rule(line: str, prefix: str) -> bool:
    return re.match(rf"^.*?: {re.escape(prefix)}: ", line) is not None


def _names_any(line: str, keys: set[str]) -> bool:
    return any(re.search(rf"\b{re.escape(key)}\b", line) for key in keys)


# stands in for limits that did not validate: the rules that read limits are not judged on it
_PLACEHOLDER_LIMITS = RunLimits(max_hours=1, max_cost_usd=1, allow_below_estimate=True)


def load_from_pulumi(stack: str) -> StackConfig:
    """Inside the Pulumi program: the same validation over the stack's config as Pulumi resolved it."""
    import pulumi

    config = pulumi.Config(NAMESPACE)
    raw: dict[object, object] = {}
    for field in StackConfig.model_fields.values():
        alias = typing.cast(str, field.alias)  # every field has one (the schema's alias_generator)
        try:
            value = config.get_object(alias)
        except pulumi.ConfigTypeError:  # the CLI hands plain scalars (provider: runpod) over as bare text
            value = config.get(alias)
        if value is not None:
            raw[f"{NAMESPACE}:{alias}"] = value
    return parse_stack(raw, _display(stack_file(stack)))
