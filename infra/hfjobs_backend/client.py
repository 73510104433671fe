"""The Jobs API through `huggingface_hub` (HfApi.run_job / inspect_job / cancel_job / list_jobs / fetch_job_logs),
with retries for what the client itself does not retry, and our labels. Used by the providers and the ops hooks.

HF_ENDPOINT (the client's own variable, also the emulator's address under test) is honoured through
`HfApi(endpoint=...)`, read at call time rather than at import.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from cloudapi.retry import RETRY_STATUSES
from contract.naming import MANAGED_LABEL
from contract.spec import ENV_MANAGED, ENV_STACK

DEFAULT_ENDPOINT = "https://huggingface.co"
TERMINAL_STAGES = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
BILLED_STAGES = ("SCHEDULING", "RUNNING")  # billed while starting or running
LABEL_STACK = ENV_STACK  # the stack a job belongs to (the reaper's and the retry-safe create's key)
LABEL_RUN = "LORASTACK_RUN_ID"

T = TypeVar("T")


def endpoint(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return (environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def managed_labels(stack: str, run_id: str) -> dict[str, str]:
    return {**MANAGED_LABEL, LABEL_STACK: stack, LABEL_RUN: run_id}


def is_managed(job: Any) -> bool:
    return (job.labels or {}).get(ENV_MANAGED) == "1"


def status_code(error: BaseException) -> int:
    """The HTTP status of a client error; 0 when no answer came (timeout, connection lost)."""
    response = getattr(error, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def is_transient(error: BaseException) -> bool:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return status_code(error) in RETRY_STATUSES or status_code(error) == 0
    return isinstance(error, (httpx.TransportError, TimeoutError, ConnectionError))


def is_not_found(error: BaseException) -> bool:
    return status_code(error) == 404


class HfJobs:
    def __init__(self, token: str, namespace: str | None = None, *, retries: int = 6, backoff: float = 0.5,
                 environ: Mapping[str, str] | None = None):
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=endpoint(environ), token=token)
        self._namespace = namespace
        self.retries, self.backoff = retries, backoff

    def retrying(self, call: Callable[[], T], retries: int | None = None) -> T:
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return call()
            except Exception as error:
                if attempt == retries or not is_transient(error):
                    raise
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    @property
    def namespace(self) -> str:
        """The stack's namespace, or the token's user (GET /api/whoami-v2), asked once."""
        if self._namespace is None:
            self._namespace = self.retrying(lambda: self.api.whoami())["name"]
        return self._namespace

    def run(self, spec: Mapping[str, Any]):
        """One POST, never retried here (HfApi.run_job does not either): the caller looks before trying again."""
        return self.api.run_job(
            image=spec["image"], command=list(spec["command"]), env=dict(spec["environment"]),
            secrets=dict(spec["secrets"]) or None, flavor=spec["flavor"], timeout=int(spec["timeoutSeconds"]),
            labels=dict(spec["labels"]), namespace=self.namespace,
        )

    def inspect(self, job_id: str):
        return self.retrying(lambda: self.api.inspect_job(job_id=job_id, namespace=self.namespace))

    def cancel(self, job_id: str) -> None:
        self.retrying(lambda: self.api.cancel_job(job_id=job_id, namespace=self.namespace))

    def list(self, labels: Mapping[str, str] | None = None) -> list:
        return self.retrying(lambda: list(self.api.list_jobs(namespace=self.namespace, labels=dict(labels or {}))))

    def logs(self, job_id: str, follow: bool) -> Iterable[str]:
        return self.api.fetch_job_logs(job_id=job_id, namespace=self.namespace, follow=follow)

    def hardware(self, retries: int = 0) -> builtins.list:  # builtins: this class has its own `list`
        return self.retrying(lambda: self.api.list_jobs_hardware(), retries)
