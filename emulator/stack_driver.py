"""`up` and `destroy` of a stack without the Pulumi CLI: the real program, the real providers, a tiny engine.

The Pulumi CLI is the engine that calls dynamic providers; where it is not installed (`make demo` on a fresh
laptop, the e2e tests) this driver runs `infra.program.build` under Pulumi's mock runtime, and its monitor plays
the engine for dynamic resources: check, then diff against the state of the last `up`, then create, update,
replace (delete first: the Pod asks for delete-before-replace) or nothing; `destroy` deletes in reverse order,
forgetting what is retained (retainOnDelete) instead of deleting it. The state is a JSON file per stack, as a
local file backend keeps one. Every operation is counted (`Operations`), so a test can assert that a second
`up` with no change creates, updates and replaces nothing.

`refresh()` reads every resource back, as `pulumi refresh` does. What it does not do: previews, imports, parallel resources, or the CLI's checkpointing of partial
updates. The providers are unpickled from the program's registration exactly as the CLI's provider host does.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dill
import pulumi
import yaml
from pulumi.dynamic.dynamic import PROVIDER_KEY
from pulumi.runtime import rpc
from pulumi.runtime.mocks import MockMonitor, Mocks

from infra.config import NAMESPACE
from infra.stack_files import stack_file


@dataclass
class Operations:
    counts: Counter = field(default_factory=Counter)  # create / update / replace / same / delete / retain
    log: list[str] = field(default_factory=list)

    def record(self, kind: str, name: str) -> None:
        self.counts[kind] += 1
        self.log.append(f"{kind} {name}")

    @property
    def changes(self) -> int:
        return sum(self.counts[kind] for kind in ("create", "update", "replace", "delete"))


def _plain(value: Any) -> Any:
    """Secrets unwrapped, as the provider host receives them."""
    value = rpc.unwrap_rpc_secret(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _provider(serialized: str):
    return dill.loads(base64.b64decode(serialized))


class _Engine(Mocks):
    def __init__(self, state: dict[str, dict], operations: Operations):
        self.state, self.operations = state, operations
        self.options: dict[str, dict] = {}  # name -> the resource options the monitor saw
        self.order: list[str] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        inputs = _plain(args.inputs)
        if PROVIDER_KEY not in inputs:  # a component: nothing to create
            return f"{args.name}-component", inputs
        serialized = inputs.pop(PROVIDER_KEY)
        provider = _provider(serialized)
        old = self.state.get(args.name)
        news = inputs
        checked = provider.check(old["outputs"] if old else {}, news)
        if checked.failures:
            problems = "; ".join(f"{failure.property}: {failure.reason}" for failure in checked.failures)
            raise pulumi.RunError(f"{args.name}: {problems}")
        news = checked.inputs
        if old is not None:
            diff = provider.diff(old["id"], old["outputs"], news)
            if not diff.changes:
                self.operations.record("same", args.name)
                outputs = old["outputs"]
                id_ = old["id"]
            elif diff.replaces:
                provider.delete(old["id"], old["outputs"])
                created = provider.create(news)
                self.operations.record("replace", args.name)
                id_, outputs = created.id, created.outs
            else:
                updated = provider.update(old["id"], old["outputs"], news)
                self.operations.record("update", args.name)
                id_, outputs = old["id"], updated.outs
        else:
            created = provider.create(news)
            self.operations.record("create", args.name)
            id_, outputs = created.id, created.outs
        self.state[args.name] = {
            "type": args.typ, "id": id_, "outputs": outputs, "provider": serialized,
            "retain": self.options.get(args.name, {}).get("retain", False),
        }
        self.order.append(args.name)
        return id_, outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict:
        return {}


class _Monitor(MockMonitor):
    creates_real_resources = True  # read by infra/runpod_backend/follow.py: these pods are real, follow them

    def __init__(self, engine: _Engine):
        super().__init__(engine)
        self.engine = engine

    def RegisterResource(self, request):
        self.engine.options[request.name] = {"retain": request.retainOnDelete}
        return super().RegisterResource(request)


class StackDriver:
    """`up()` and `destroy()` of one stack; state in `<state_dir>/<stack>.json`."""

    def __init__(self, stack: str, state_dir: Path, secrets: dict[str, str] | None = None,
                 overrides: dict[str, Any] | None = None, log: logging.Logger | None = None):
        """`secrets`: config secrets by name (runpodApiKey, hfToken, ...); `overrides`: `lorastack:<key>` values
        replacing the stack file's."""
        self.stack = stack
        self.state_path = Path(state_dir) / f"{stack}.json"
        self.secrets = dict(secrets or {})
        self.overrides = dict(overrides or {})
        self.log = log or _printing_logger()

    def _load(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {"resources": {}, "outputs": {}}

    def _save(self, state: dict) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps(state, indent=2, default=str))

    def config(self) -> dict[str, Any]:
        document = yaml.safe_load(stack_file(self.stack).read_text()) or {}
        config = dict(document.get("config") or {})
        config.update(self.overrides)
        return config

    def up(self) -> tuple[dict, Operations]:
        """Run the program; returns the stack outputs and what was done."""
        from infra.program import build

        state = self._load()
        operations = Operations()
        engine = _Engine(state["resources"], operations)
        monitor = _Monitor(engine)
        pulumi.runtime.set_mocks(engine, project="lorastack", stack=self.stack, preview=False, logger=self.log, monitor=monitor)
        values = {key: json.dumps(value) for key, value in self.config().items()}
        secret_keys = [f"{NAMESPACE}:{name}" for name in self.secrets]
        values.update({f"{NAMESPACE}:{name}": value for name, value in self.secrets.items()})
        pulumi.runtime.set_all_config(values, secret_keys)
        outputs: dict = {}

        @pulumi.runtime.test
        def program():
            exports = build(self.stack)
            resolved = {key: pulumi.Output.from_input(value) for key, value in exports.items()}
            return pulumi.Output.all(**resolved).apply(outputs.update)

        try:
            program()
        finally:
            # resources the program no longer declares are deleted, as `pulumi up` does
            for name in [name for name in state["resources"] if name not in engine.order]:
                self._delete(name, state["resources"].pop(name), operations)
            state["order"] = engine.order or state.get("order", [])
            state["outputs"] = _plain(outputs)
            self._save(state)
        return state["outputs"], operations

    def refresh(self) -> Operations:
        """`pulumi refresh`: read every resource back; one gone outside Pulumi leaves the state."""
        state = self._load()
        operations = Operations()
        for name, resource in list(state["resources"].items()):
            read = _provider(resource["provider"]).read(resource["id"], resource["outputs"])
            if not read.id:
                del state["resources"][name]
                operations.record("gone", name)
            else:
                resource["outputs"] = read.outs
        self._save(state)
        return operations

    def destroy(self) -> Operations:
        state = self._load()
        operations = Operations()
        resources = state["resources"]
        for name in reversed(state.get("order") or list(resources)):
            if name in resources:
                self._delete(name, resources.pop(name), operations)
                self._save(state)  # a failure part-way leaves the rest in the state, as the CLI does
        state["outputs"] = {}
        self._save(state)
        return operations

    def _delete(self, name: str, resource: dict, operations: Operations) -> None:
        if resource.get("retain"):
            operations.record("retain", name)
            return
        _provider(resource["provider"]).delete(resource["id"], resource["outputs"])
        operations.record("delete", name)


def _printing_logger() -> logging.Logger:
    logger = logging.getLogger("lorastack.stack_driver")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("  %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
