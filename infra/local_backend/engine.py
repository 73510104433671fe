"""The Docker engine that runs a local stack's container, reached through the `docker` SDK.

The address is the SDK's: DOCKER_HOST (and DOCKER_TLS_VERIFY / DOCKER_CERT_PATH), else the default socket.
Nothing here is needed by `make check` or `make cost`; `pulumi preview` declares without asking the engine, and
`pulumi up` (or status/logs/reap) without an engine fails with one message that says what to start.

The engine's API takes no idempotency key and the SDK does not retry, so `call` retries what is safe to repeat
(reads, stop, remove) through 429, 5xx and lost connections; creates are made retry-safe by the provider.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import docker
import requests
from docker.errors import APIError, DockerException

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
TRANSIENT_STATUSES = (429, 500, 502, 503, 504)
MANAGED_LABEL = "lorastack.managed"
STACK_LABEL = "lorastack.stack"
INPUTS_LABEL = "lorastack.inputs"  # a digest of the create's inputs: an earlier try's container is recognised by it

T = TypeVar("T")


class NoEngine(RuntimeError):
    """No Docker engine answers at the configured address."""


def engine_address(environ: Mapping[str, str]) -> str:
    return environ.get("DOCKER_HOST") or DEFAULT_SOCKET


def no_engine_message(environ: Mapping[str, str], error: Exception) -> str:
    return (f"no Docker engine at {engine_address(environ)}: start Docker Desktop / dockerd, or use make train-local "
            f"(the same trainer without a container) [{type(error).__name__}]")


def connect(environ: Mapping[str, str], timeout: float = 60.0) -> docker.DockerClient:
    """A client of the engine at DOCKER_HOST (or the default socket); NoEngine when none answers."""
    try:
        client = docker.DockerClient.from_env(environment=dict(environ), timeout=int(max(timeout, 1)))
        client.ping()
    except (DockerException, requests.RequestException) as error:
        raise NoEngine(no_engine_message(environ, error)) from None
    return client


def is_transient(error: Exception) -> bool:
    if isinstance(error, APIError):
        return error.status_code in TRANSIENT_STATUSES
    return isinstance(error, requests.RequestException)


def call(action: Callable[[], T], retries: int = 6, backoff: float = 0.5) -> T:
    """`action()` again after a transient failure (only for what is safe to repeat)."""
    for attempt in range(retries + 1):
        try:
            return action()
        except (APIError, requests.RequestException) as error:
            if not is_transient(error) or attempt == retries:
                raise
        time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")
