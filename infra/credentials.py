"""Credentials: the secret config keys and the environment variables that stand in for them.

Secrets are never part of StackConfig, so they never land in a plain object that could be logged or pickled.

One place for every command: the Pulumi program reads a stack's secret config (`secret()`), and the commands that
run outside Pulumi (`make status`, `logs`, `fetch`, `reap`) read the same secret config through the Pulumi CLI when
the CLI and the stack are there (`pulumi config get lorastack:runpodApiKey --stack <stack>`), the environment
variable otherwise, and say which they used, never the value (`use_stack_credentials()`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import pulumi

# Secret config keys and the environment variables that stand in for them (CI, local shells).
SECRETS = {
    "runpodApiKey": "RUNPOD_API_KEY",
    "replicateApiToken": "REPLICATE_API_TOKEN",
    "lambdaApiKey": "LAMBDA_API_KEY",
    "hfToken": "HF_TOKEN",
    "wandbApiKey": "WANDB_API_KEY",
    # RunPod's S3-compatible API for network volumes (dataset uploads, make fetch): a key pair separate from the
    # API key, made under Settings > S3 API Keys; the access key is the user id (user_...), the secret rps_...
    "runpodS3AccessKey": "RUNPOD_S3_ACCESS_KEY",
    "runpodS3Secret": "RUNPOD_S3_SECRET_KEY",
    "vastApiKey": "VAST_API_KEY",
    # the S3-compatible bucket a Vast.ai run is mirrored to (lorastack:vast.bucket), under boto3's own names
    "bucketAccessKeyId": "AWS_ACCESS_KEY_ID",
    "bucketSecretAccessKey": "AWS_SECRET_ACCESS_KEY",
}
# What each backend's status/logs/fetch/reap hooks read is the backend's own (Backend.ops_secrets); `make fetch`
# also reads a private Hub repo of any backend's stack with this one when it is set.
FETCH_OPTIONAL_SECRETS = ("hfToken",)
PULUMI_ENV = "PULUMI"  # the Pulumi CLI to run (the Makefile's PULUMI=...), default `pulumi` on PATH
PULUMI_TIMEOUT_S = 60.0  # a Pulumi Cloud round trip; a hung login must not hang `make status`
PROJECT_DIR = Path(__file__).resolve().parent.parent  # Pulumi.yaml: the project whose stacks these are


def secret(name: str, pulumi_config: pulumi.Config | None = None) -> object | None:
    """A secret from Pulumi config (stays a secret Output) or, failing that, its environment variable."""
    if pulumi_config is not None:
        value = pulumi_config.get_secret(name)
        if value is not None:
            return value
    env = os.environ.get(SECRETS[name])
    if env and pulumi_config is not None:
        import pulumi

        return pulumi.Output.secret(env)
    return env


@dataclass(frozen=True)
class Credential:
    name: str  # the config key (runpodApiKey)
    value: str | None = None
    source: str = ""  # where it came from, or why it was not found: printed, so never the value

    def __repr__(self) -> str:  # a Credential in a traceback or a log must not show the value
        return f"Credential({self.name!r}, source={self.source!r})"


Runner = Callable[..., subprocess.CompletedProcess]


def find_credential(name: str, stacks: Iterable[str], environ: MutableMapping[str, str] | None = None,
                    run: Runner = subprocess.run) -> Credential:
    """The stack's own secret config when the Pulumi CLI and a stack holding the key are there, else the
    environment variable. `stacks` are tried in order (the reaper has no single stack)."""
    environ = os.environ if environ is None else environ
    env_name = SECRETS[name]
    pulumi = environ.get(PULUMI_ENV) or "pulumi"
    tried: list[str] = []
    holders = [stack for stack in stacks if _file_holds_secret(stack, name)]
    if holders and shutil.which(pulumi, path=environ.get("PATH")) is None:
        tried.append(f"no Pulumi CLI ({pulumi}) to decrypt {name} in the stack file")
    elif holders:
        for stack in holders:
            command = [pulumi, "config", "get", f"lorastack:{name}", "--stack", stack]
            try:
                done = run(command, cwd=PROJECT_DIR, env=dict(environ), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=PULUMI_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as error:
                tried.append(f"`pulumi config get {name} --stack {stack}` did not answer ({type(error).__name__})")
                continue
            value = done.stdout.strip()
            if done.returncode == 0 and value:
                return Credential(name, value, f"the {stack} stack's secret config (pulumi config get {name})")
            reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1][:200]
            tried.append(f"`pulumi config get {name} --stack {stack}` failed: {reason}")
    if environ.get(env_name):
        return Credential(name, environ[env_name], f"the environment (${env_name})" + _because(tried))
    where = (f"`pulumi config set --secret {name} <value> --stack <stack>`, or export {env_name}=<value>")
    return Credential(name, None, f"not set ({where})" + _because(tried))


def use_stack_credentials(required: Iterable[str], optional: Iterable[str], stacks: Iterable[str],
                          environ: MutableMapping[str, str] | None = None, report: TextIO | None = None,
                          run: Runner = subprocess.run) -> None:
    """Put the secrets a command reads into `environ` (this process's own, by default), from the stack's config or
    the environment, and say on `report` (stderr) where each came from: a `required` one always (also when it is
    not set, with how to set it), an `optional` one only when found."""
    environ = os.environ if environ is None else environ
    report = report or sys.stderr
    stacks, required = list(stacks), tuple(required)
    for name in dict.fromkeys((*required, *optional)):
        found = find_credential(name, stacks, environ, run)
        if found.value or name in required:
            print(f"{name}: {found.source}", file=report, flush=True)
        if found.value:
            environ[SECRETS[name]] = found.value


def _file_holds_secret(stack: str, name: str) -> bool:
    """Whether the stack file has `lorastack:<name>: {secure: ...}` (set with `pulumi config set --secret`)."""
    from infra.stack_files import StackError, read_stack_document, stack_file

    try:
        value = read_stack_document(stack_file(stack)).get(f"lorastack:{name}")
    except StackError:
        return False
    return isinstance(value, dict) and "secure" in value


def _because(tried: list[str]) -> str:
    return f"; {'; '.join(tried)}" if tried else ""
