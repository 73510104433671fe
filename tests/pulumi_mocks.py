"""Running a Pulumi program under pulumi.runtime.set_mocks, recording what it asks the engine for.

The monitor keeps each registration's type, inputs and resource options, so tests assert what `pulumi up`
would do: which resources, with which properties, retained on delete or not, which outputs secret.
"""

from __future__ import annotations

from collections.abc import Callable

import pulumi
from pulumi.runtime import rpc
from pulumi.runtime.mocks import MockMonitor


class RecordingMonitor(MockMonitor):
    def __init__(self, mocks: pulumi.runtime.Mocks):
        super().__init__(mocks)
        self.registered: dict[str, dict] = {}

    def RegisterResource(self, request):
        self.registered[request.name] = {
            "type": request.type,
            "inputs": rpc.deserialize_properties(request.object),
            "retainOnDelete": request.retainOnDelete,
            "deleteBeforeReplace": request.deleteBeforeReplace,
            "additionalSecretOutputs": list(request.additionalSecretOutputs),
        }
        return super().RegisterResource(request)

    def of_type(self, type_: str) -> list[dict]:
        return [entry for entry in self.registered.values() if entry["type"] == type_]

    def one(self, type_: str) -> dict:
        (entry,) = self.of_type(type_)
        return entry

    def count(self, type_: str) -> int:
        return len(self.of_type(type_))


def run_mocked(
    mocks: pulumi.runtime.Mocks,
    stack: str,
    declare: Callable[[], dict],
    config: dict[str, str] | None = None,
    secret_keys: list[str] | None = None,
) -> tuple[RecordingMonitor, dict]:
    """Run `declare()` as stack `stack`'s program with `config`; returns the monitor and the resolved exports."""
    monitor = RecordingMonitor(mocks)
    pulumi.runtime.set_mocks(mocks, project="lorastack", stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config(config or {}, secret_keys or [])
    outputs: dict = {}

    @pulumi.runtime.test
    def program():
        exports = declare()
        return pulumi.Output.all(**{key: pulumi.Output.from_input(value) for key, value in exports.items()}).apply(
            outputs.update
        )

    program()
    return monitor, outputs
