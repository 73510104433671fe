"""Run the Pulumi program the way `pulumi up` runs it, where the Pulumi CLI is not installed.

Three processes, as with the CLI:
- the engine (this module, in the caller's process): a gRPC ResourceMonitor and Engine server. It turns each
  RegisterResource into a step (create, update, replace, same) against the stack's state file, keeps the stack
  outputs, prints the program's log, and deletes what the program no longer declares;
- the program: `python <exec script> --monitor ... --pwd <main> .` started like Pulumi's Python language host
  starts it (emulator/language_exec.py, run from a directory of its own): working directory = Pulumi.yaml's
  `main`, `runpy.run_path(".")`, the stack's configuration in PULUMI_CONFIG as the CLI passes it (every value a
  string, objects as JSON) with the secret keys in PULUMI_CONFIG_SECRET_KEYS;
- the dynamic-provider host: the SDK's own `python -m pulumi.dynamic` (a gRPC ResourceProvider that prints its
  port), started in the program directory, configured with the stack's configuration, and called with Check,
  Diff, Create, Update, Delete and Read over gRPC. It unpickles each provider from the `__provider` bytes the
  program registered, exactly as under the CLI.

The state is a JSON file per stack. Secret values (a secret config value, the pickled provider, a pod's env) are
kept in it in Pulumi's secret wrapper with the value replaced by AES-256-GCM ciphertext, under a key derived
from PULUMI_CONFIG_PASSPHRASE (empty if unset, as `make` exports it) and the state file's salt.
docs/engine.md lists what of the real engine this does not reproduce.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import secrets as secrets_module
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import grpc
import yaml
from google.protobuf import empty_pb2, json_format, struct_pb2
from pulumi.runtime import rpc
from pulumi.runtime.proto import (
    engine_pb2,
    engine_pb2_grpc,
    provider_pb2,
    provider_pb2_grpc,
    resource_pb2,
    resource_pb2_grpc,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXEC_SCRIPT = Path(__file__).with_name("language_exec.py")
EXEC_NAME = "pulumi-language-python-exec"
STACK_TYPE = "pulumi:pulumi:Stack"
DYNAMIC_TYPE_PREFIX = "pulumi-python:dynamic"
PROVIDER_KEY = "__provider"
SECRET_SIG = {rpc._special_sig_key: rpc._special_secret_sig}
PASSPHRASE_ENV = "PULUMI_CONFIG_PASSPHRASE"
KDF_ITERATIONS = 1_000_000  # Pulumi's passphrase secrets manager derives its key with as many PBKDF2 rounds
STATE_VERSION = 1
PROVIDER_START_TIMEOUT_S = 60


class ProgramError(Exception):
    """The program failed (its error log lines are the message), or the engine refused what it asked for."""


@dataclass
class Operations:
    counts: Counter = field(default_factory=Counter)  # create / update / replace / same / delete / retain / gone
    log: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, kind: str, name: str) -> None:
        with self._lock:  # resources register from the engine's server threads
            self.counts[kind] += 1
            self.log.append(f"{kind} {name}")

    @property
    def changes(self) -> int:
        return sum(self.counts[kind] for kind in ("create", "update", "replace", "delete"))


@dataclass
class Registration:
    """What the program asked the engine for, as a test reads it."""

    urn: str
    type: str
    name: str
    custom: bool
    inputs: dict  # deserialized by the SDK's rpc module: secrets stay wrapped (rpc.is_rpc_secret)
    retain_on_delete: bool
    delete_before_replace: bool
    additional_secret_outputs: list[str]


@dataclass
class ProgramRun:
    outputs: dict  # the stack outputs, secrets unwrapped
    registrations: dict[str, Registration]  # by resource name
    operations: Operations

    def of_type(self, type_: str) -> list[Registration]:
        return [entry for entry in self.registrations.values() if entry.type == type_]

    def one(self, type_: str) -> Registration:
        (entry,) = self.of_type(type_)
        return entry


# --- Pulumi.yaml and the stack's configuration -------------------------------------------------------------

@dataclass(frozen=True)
class Project:
    root: Path
    name: str
    main: Path  # the program directory: the language host's --pwd

    @classmethod
    def load(cls, root: Path = PROJECT_ROOT) -> Project:
        document = yaml.safe_load((root / "Pulumi.yaml").read_text()) or {}
        runtime = document.get("runtime")
        runtime_name = runtime.get("name") if isinstance(runtime, dict) else runtime
        if runtime_name != "python":
            raise ProgramError(f"{root / 'Pulumi.yaml'}: runtime: {runtime_name!r}; this engine runs python programs only")
        return cls(root, document["name"], (root / document.get("main", ".")).resolve())


def cli_config(values: dict[str, Any], secrets: dict[str, str], source: str) -> tuple[dict[str, str], list[str]]:
    """The stack's config as the CLI hands it to the language host: every value a string (objects and lists as
    JSON, booleans as true/false), secrets decrypted, with their keys listed apart."""
    config: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and "secure" in value:
            raise ProgramError(f"{source}: {key}: a value encrypted by the Pulumi CLI; without the CLI, pass it as a "
                               "secret to the driver (StackDriver(secrets=...)) or its environment variable")
        if value is None:
            continue
        if isinstance(value, bool):
            config[key] = "true" if value else "false"
        elif isinstance(value, (dict, list)):
            config[key] = json.dumps(value)
        else:
            config[key] = str(value)
    config.update(secrets)
    return config, sorted(secrets)


# --- secrets in the state file ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _derive_key(passphrase: str, salt: str) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", passphrase.encode(), base64.b64decode(salt), KDF_ITERATIONS, dklen=32)


class SecretsBox:
    """AES-256-GCM under a passphrase-derived key: secret values go into the state as ciphertext only."""

    def __init__(self, salt: str, passphrase: str | None = None):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        passphrase = os.environ.get(PASSPHRASE_ENV, "") if passphrase is None else passphrase
        self._aead = AESGCM(_derive_key(passphrase, salt))

    def encrypt(self, value: Any) -> str:
        nonce = secrets_module.token_bytes(12)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, json.dumps(value).encode(), None)).decode()

    def decrypt(self, ciphertext: str) -> Any:
        from cryptography.exceptions import InvalidTag

        raw = base64.b64decode(ciphertext)
        try:
            return json.loads(self._aead.decrypt(raw[:12], raw[12:], None))
        except InvalidTag:
            raise ProgramError(f"the state's secrets do not decrypt: is {PASSPHRASE_ENV} the one it was written with?") from None


def is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(rpc._special_sig_key) == rpc._special_secret_sig


def secret(value: Any) -> dict:
    return {**SECRET_SIG, "value": value}


def reveal(value: Any) -> Any:
    """Secrets unwrapped: what a provider that does not accept secrets is sent, and what the caller reads."""
    if is_secret(value):
        return reveal(value.get("value"))
    if isinstance(value, dict):
        return {key: reveal(item) for key, item in value.items()}
    if isinstance(value, list):
        return [reveal(item) for item in value]
    return value


def has_secret(value: Any) -> bool:
    if is_secret(value):
        return True
    if isinstance(value, dict):
        return any(has_secret(item) for item in value.values())
    if isinstance(value, list):
        return any(has_secret(item) for item in value)
    return False


def seal(value: Any, box: SecretsBox) -> Any:
    if is_secret(value):
        return {**SECRET_SIG, "ciphertext": box.encrypt(value.get("value"))}
    if isinstance(value, dict):
        return {key: seal(item, box) for key, item in value.items()}
    if isinstance(value, list):
        return [seal(item, box) for item in value]
    return value


def unseal(value: Any, box: SecretsBox) -> Any:
    if is_secret(value) and "ciphertext" in value:
        return secret(box.decrypt(value["ciphertext"]))
    if isinstance(value, dict):
        return {key: unseal(item, box) for key, item in value.items()}
    if isinstance(value, list):
        return [unseal(item, box) for item in value]
    return value


def to_struct(properties: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(properties)
    return struct


def from_struct(struct: struct_pb2.Struct) -> dict:
    return json_format.MessageToDict(struct)


# --- the stack's state --------------------------------------------------------------------------------------

@dataclass
class Resource:
    urn: str
    type: str
    name: str
    custom: bool
    id: str = ""
    inputs: dict = field(default_factory=dict)  # property values, secrets wrapped
    outputs: dict = field(default_factory=dict)
    retain_on_delete: bool = False
    parent: str = ""

    def as_json(self, box: SecretsBox) -> dict:
        return {"urn": self.urn, "type": self.type, "name": self.name, "custom": self.custom, "id": self.id,
                "inputs": seal(self.inputs, box), "outputs": seal(self.outputs, box),
                "retainOnDelete": self.retain_on_delete, "parent": self.parent}

    @classmethod
    def from_json(cls, entry: dict, box: SecretsBox) -> Resource:
        return cls(entry["urn"], entry["type"], entry["name"], entry["custom"], entry["id"],
                   unseal(entry["inputs"], box), unseal(entry["outputs"], box), entry["retainOnDelete"], entry["parent"])


class StackState:
    """`<state_dir>/<stack>.json`: the resources in the order they were registered (dependencies first), the stack
    outputs, and the salt of the key that encrypts the secrets in them."""

    def __init__(self, path: Path, passphrase: str | None = None):
        self.path = path
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            document = {"version": STATE_VERSION, "encryptionSalt": base64.b64encode(secrets_module.token_bytes(16)).decode(),
                        "resources": [], "outputs": {}}
        self.salt = document["encryptionSalt"]
        self.box = SecretsBox(self.salt, passphrase)
        self.resources: dict[str, Resource] = {}
        for entry in document["resources"]:
            resource = Resource.from_json(entry, self.box)
            self.resources[resource.urn] = resource
        self.outputs: dict = unseal(document["outputs"], self.box)
        self.lock = threading.RLock()

    def save(self) -> None:
        with self.lock:
            document = {"version": STATE_VERSION, "encryptionSalt": self.salt,
                        "resources": [resource.as_json(self.box) for resource in self.resources.values()],
                        "outputs": seal(self.outputs, self.box)}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".json.partial")
            partial.write_text(json.dumps(document, indent=2))
            partial.replace(self.path)

    def put(self, resource: Resource) -> None:
        """Registered now: it moves after everything registered before it (the order destroy reverses)."""
        with self.lock:
            self.resources.pop(resource.urn, None)
            self.resources[resource.urn] = resource
            self.save()

    def remove(self, urn: str) -> None:
        with self.lock:
            self.resources.pop(urn, None)
            self.save()


# --- the dynamic-provider host ------------------------------------------------------------------------------

class ProviderHost:
    """The SDK's dynamic-provider host (`python -m pulumi.dynamic`), started like the engine starts the
    pulumi-python plugin: in the program directory, its gRPC port read from its first line of output."""

    def __init__(self, program_dir: Path, config: dict[str, str], secret_keys: list[str]):
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "pulumi.dynamic"], cwd=program_dir,
            stdout=subprocess.PIPE, stderr=None, env=dict(os.environ), start_new_session=True,
        )
        self.output = cast(IO[bytes], self.process.stdout)  # stdout=PIPE: always a pipe
        port = self._read_port()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(self.channel).result(timeout=PROVIDER_START_TIMEOUT_S)
        self.stub = provider_pb2_grpc.ResourceProviderStub(self.channel)
        # the engine hands the pulumi-python provider the whole stack config; the host unwraps the secrets
        args = {key: secret(value) if key in secret_keys else value for key, value in config.items()}
        self.stub.Configure(provider_pb2.ConfigureRequest(args=to_struct(args), acceptSecrets=True, acceptResources=True))

    def _read_port(self) -> int:
        line = self.output.readline().decode().strip()
        if not line.isdigit():
            self.process.kill()
            raise ProgramError(f"the dynamic provider host (python -m pulumi.dynamic) did not start: {line!r}")
        return int(line)

    def call(self, method: str, request):
        try:
            return getattr(self.stub, method)(request)
        except grpc.RpcError as error:
            raise ProviderError(f"{request.name} ({request.type}): {method} failed: {error.details()}") from None

    def close(self) -> None:
        self.channel.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.output.close()


class ProviderError(ProgramError):
    pass


def _plain_struct(properties: dict) -> struct_pb2.Struct:
    return to_struct(reveal(properties))  # the dynamic host answers Configure with acceptSecrets=False


def _mark_secret_outputs(outputs: dict, inputs: dict, additional: list[str]) -> dict:
    """As the engine does: an output named like a secret input, or listed in additionalSecretOutputs, is secret."""
    return {key: secret(value) if not is_secret(value) and (has_secret(inputs.get(key)) or key in additional) else value
            for key, value in outputs.items()}


# --- the engine: steps ------------------------------------------------------------------------------------

class Deployment:
    """The steps of an `up` (or, with dry_run, its preview) against a stack's state, through the provider host."""

    def __init__(self, state: StackState, provider_host: Callable[[], ProviderHost], dry_run: bool,
                 operations: Operations):
        self.state, self.dry_run, self.operations = state, dry_run, operations
        self._provider_host = provider_host
        self.old = dict(state.resources)  # the state as it was before this run
        self.registered: list[str] = []
        self._host: ProviderHost | None = None
        self._host_lock = threading.Lock()

    @property
    def host(self) -> ProviderHost:
        """Started at the first resource that needs it (a preview of nothing, or a destroy of nothing, starts none)."""
        with self._host_lock:
            if self._host is None:
                self._host = self._provider_host()
            return self._host

    def close(self) -> None:
        if self._host is not None:
            self._host.close()

    def register(self, request, urn: str, inputs: dict) -> tuple[str, dict]:
        self.registered.append(urn)
        if not request.custom:
            if not self.dry_run:
                old = self.old.get(urn)
                self.state.put(Resource(urn, request.type, request.name, False, outputs=old.outputs if old else {},
                                        parent=request.parent))
            return "", {}
        if not request.type.startswith(DYNAMIC_TYPE_PREFIX) or request.provider:
            raise ProgramError(f"{urn}: only resources of Pulumi's Python dynamic providers run without the Pulumi "
                               "CLI; this one needs `pulumi up`")
        return self._step(request, urn, inputs)

    def _step(self, request, urn: str, news: dict) -> tuple[str, dict]:
        old = self.old.get(urn)
        checked = self.host.call("Check", provider_pb2.CheckRequest(
            urn=urn, name=request.name, type=request.type,
            olds=_plain_struct(old.inputs if old else {}), news=_plain_struct(news)))
        if checked.failures:
            problems = "; ".join(f"{failure.property}: {failure.reason}" for failure in checked.failures)
            raise ProgramError(f"{request.name}: {problems}")
        inputs = _mark_secret_outputs(from_struct(checked.inputs), news, [])
        additional = list(request.additionalSecretOutputs)
        if old is None:
            kind = "create"
        else:
            diff = self.host.call("Diff", provider_pb2.DiffRequest(
                id=old.id, urn=urn, name=request.name, type=request.type, olds=_plain_struct(old.outputs),
                news=_plain_struct(inputs), old_inputs=_plain_struct(old.inputs)))
            if diff.changes == provider_pb2.DiffResponse.DIFF_UNKNOWN:
                changed = reveal(old.inputs) != reveal(inputs)
            else:
                changed = diff.changes == provider_pb2.DiffResponse.DIFF_SOME
            kind = "same" if not changed else "replace" if diff.replaces else "update"
        self.operations.record(kind, request.name)
        if kind == "same" and old is not None:
            resource = Resource(urn, request.type, request.name, True, old.id, inputs, old.outputs,
                                request.retainOnDelete, request.parent)
            if not self.dry_run:
                self.state.put(resource)
            return old.id, old.outputs
        if self.dry_run:  # a preview changes nothing: the outputs it cannot know are left out (unknown)
            return (old.id if old and kind == "update" else ""), inputs
        if kind == "update" and old is not None:
            updated = self.host.call("Update", provider_pb2.UpdateRequest(
                id=old.id, urn=urn, name=request.name, type=request.type, olds=_plain_struct(old.outputs),
                news=_plain_struct(inputs), old_inputs=_plain_struct(old.inputs)))
            id_, outputs = old.id, from_struct(updated.properties)
        else:
            delete_first = kind == "replace" and (diff.deleteBeforeReplace or request.deleteBeforeReplace)
            if delete_first and old is not None:
                self._delete_resource(old, record=False)
            created = self.host.call("Create", provider_pb2.CreateRequest(
                urn=urn, name=request.name, type=request.type, properties=_plain_struct(inputs)))
            id_, outputs = created.id, from_struct(created.properties)
            if kind == "replace" and not delete_first and old is not None:
                self._delete_resource(old, record=False)
        outputs = _mark_secret_outputs(outputs, inputs, additional)
        self.state.put(Resource(urn, request.type, request.name, True, id_, inputs, outputs,
                                request.retainOnDelete, request.parent))
        return id_, outputs

    def set_outputs(self, urn: str, outputs: dict) -> None:
        if self.dry_run:
            return
        with self.state.lock:
            resource = self.state.resources.get(urn)
            if resource is not None:
                resource.outputs = outputs
            if urn.split("::")[2] == STACK_TYPE:
                self.state.outputs = outputs
            self.state.save()

    def delete_unregistered(self) -> None:
        """After a successful run: what the program no longer declares goes, the newest first."""
        for urn in reversed([urn for urn in self.old if urn not in self.registered]):
            self.delete(self.old[urn])

    def delete(self, resource: Resource) -> None:
        if resource.custom:
            if resource.retain_on_delete:
                self.operations.record("retain", resource.name)
            else:
                self._delete_resource(resource, record=True)
        self.state.remove(resource.urn)

    def _delete_resource(self, resource: Resource, record: bool) -> None:
        if resource.retain_on_delete and not record:  # a replaced resource that is retained is only forgotten
            return
        self.host.call("Delete", provider_pb2.DeleteRequest(
            id=resource.id, urn=resource.urn, name=resource.name, type=resource.type,
            properties=_plain_struct(resource.outputs), old_inputs=_plain_struct(resource.inputs)))
        if record:
            self.operations.record("delete", resource.name)

    def refresh(self) -> None:
        for resource in list(self.state.resources.values()):
            if not resource.custom:
                continue
            read = self.host.call("Read", provider_pb2.ReadRequest(
                id=resource.id, urn=resource.urn, name=resource.name, type=resource.type,
                properties=_plain_struct(resource.outputs), inputs=_plain_struct(resource.inputs)))
            if not read.id:
                self.operations.record("gone", resource.name)
                self.state.remove(resource.urn)
                continue
            was_secret = [key for key, value in resource.outputs.items() if is_secret(value)]  # additionalSecretOutputs
            resource.outputs = _mark_secret_outputs(from_struct(read.properties), resource.inputs, was_secret)
            if read.HasField("inputs"):
                resource.inputs = _mark_secret_outputs(from_struct(read.inputs), resource.inputs, [])
            self.state.put(resource)


class MockedResources:
    """Instead of a deployment: each resource's id and outputs come from `pulumi.runtime.Mocks.new_resource`, as
    under set_mocks, while the program still runs as the language host runs it (unit tests of the program)."""

    def __init__(self, mocks, operations: Operations):
        self.mocks, self.operations = mocks, operations

    def register(self, request, urn: str, inputs: dict) -> tuple[str, dict]:
        from pulumi.runtime.mocks import MockResourceArgs

        if not request.custom:
            return "", {}
        args = MockResourceArgs(typ=request.type, name=request.name, inputs=rpc.deserialize_properties(request.object, True),
                                provider=request.provider, resource_id=request.importId, custom=True)
        id_, outputs = self.mocks.new_resource(args)
        self.operations.record("create", request.name)
        return id_, _mark_secret_outputs(json.loads(json.dumps(outputs)), inputs, list(request.additionalSecretOutputs))

    def set_outputs(self, urn: str, outputs: dict) -> None:
        pass


# --- the engine: gRPC services ------------------------------------------------------------------------------

class _Monitor(resource_pb2_grpc.ResourceMonitorServicer):
    def __init__(self, project: str, stack: str, steps, registrations: dict[str, Registration]):
        self.project, self.stack, self.steps, self.registrations = project, stack, steps, registrations
        self.lock = threading.Lock()
        self.stack_outputs: dict = {}

    def urn(self, parent: str, type_: str, name: str) -> str:
        qualified = type_
        if parent:
            parent_type = parent.split("::")[2]
            if parent_type != STACK_TYPE:
                qualified = f"{parent_type}${type_}"
        return f"urn:pulumi:{self.stack}::{self.project}::{qualified}::{name}"

    def GetDeploymentInfo(self, request, context):
        # what this engine implements: secrets; the SDK then sends plain values for everything else it would
        # otherwise encode as a feature (resource references, output values, ...)
        return resource_pb2.DeploymentInfo(supportedFeatures=[resource_pb2.RESOURCE_MONITOR_FEATURE_SECRETS])

    def SupportsFeature(self, request, context):
        return resource_pb2.SupportsFeatureResponse(hasSupport=request.id == "secrets")

    def RegisterResource(self, request, context):
        urn = self.urn(request.parent, request.type, request.name)
        inputs = from_struct(request.object)
        with self.lock:
            self.registrations[request.name] = Registration(
                urn, request.type, request.name, request.custom, rpc.deserialize_properties(request.object, True),
                request.retainOnDelete, request.deleteBeforeReplace, list(request.additionalSecretOutputs))
        if request.type == STACK_TYPE:
            return resource_pb2.RegisterResourceResponse(urn=urn)
        try:
            id_, outputs = self.steps.register(request, urn, inputs)
        except ProgramError as error:
            context.abort(grpc.StatusCode.UNKNOWN, str(error))
        except Exception as error:  # a bug of this engine: the program reports it and fails
            logging.getLogger(__name__).exception("RegisterResource %s", urn)
            context.abort(grpc.StatusCode.INTERNAL, f"{urn}: the offline engine failed: {error!r}")
        return resource_pb2.RegisterResourceResponse(urn=urn, id=id_, object=to_struct(outputs))

    def RegisterResourceOutputs(self, request, context):
        outputs = from_struct(request.outputs)
        if request.urn.split("::")[2] == STACK_TYPE:
            self.stack_outputs = outputs
        self.steps.set_outputs(request.urn, outputs)
        return empty_pb2.Empty()

    def Invoke(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{request.tok}: invokes need the Pulumi CLI")

    def SignalAndWaitForShutdown(self, request, context):
        return empty_pb2.Empty()


class _EngineService(engine_pb2_grpc.EngineServicer):
    def __init__(self, log: logging.Logger):
        self.log = log
        self.errors: list[str] = []
        self.root = ""

    def Log(self, request, context):
        if request.severity == engine_pb2.ERROR:
            self.errors.append(request.message)
            self.log.error(request.message)
        elif request.severity == engine_pb2.WARNING:
            self.log.warning(request.message)
        elif request.severity == engine_pb2.INFO:
            self.log.info(request.message)
        else:
            self.log.debug(request.message)
        return empty_pb2.Empty()

    def GetRootResource(self, request, context):
        return engine_pb2.GetRootResourceResponse(urn=self.root)

    def SetRootResource(self, request, context):
        self.root = request.urn
        return engine_pb2.SetRootResourceResponse()


def run_program(project: Project, stack: str, config: dict[str, str], secret_keys: list[str], steps,
                registrations: dict[str, Registration], dry_run: bool, log: logging.Logger,
                environ: dict[str, str] | None = None) -> dict:
    """Start the engine's gRPC services and run the program as the language host does; returns the stack's outputs.
    Raises ProgramError with the program's error lines when it fails."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    monitor = _Monitor(project.name, stack, steps, registrations)
    engine = _EngineService(log)
    resource_pb2_grpc.add_ResourceMonitorServicer_to_server(monitor, server)
    engine_pb2_grpc.add_EngineServicer_to_server(engine, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    exec_dir = Path(tempfile.mkdtemp(prefix="pulumi-bin-"))
    try:
        script = exec_dir / EXEC_NAME
        shutil.copyfile(EXEC_SCRIPT, script)
        address = f"127.0.0.1:{port}"
        command = [sys.executable, str(script), "--monitor", address, "--engine", address, "--project", project.name,
                   "--root_directory", str(project.root), "--stack", stack, "--pwd", str(project.main),
                   "--dry_run", "true" if dry_run else "false", "--parallel", "16", "--organization", "organization", "."]
        env = dict(os.environ if environ is None else environ)
        env.update({"PULUMI_CONFIG": json.dumps(config), "PULUMI_CONFIG_SECRET_KEYS": json.dumps(secret_keys)})
        process = subprocess.run(command, cwd=project.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = process.stdout.decode(errors="replace").strip()
        if output:  # the CLI shows what the program prints as diagnostics
            for line in output.splitlines():
                log.info(line)
        if process.returncode != 0:
            raise ProgramError("\n".join(engine.errors) or output or f"the program exited with {process.returncode}")
    finally:
        server.stop(None)
        shutil.rmtree(exec_dir, ignore_errors=True)
    return reveal(monitor.stack_outputs)
