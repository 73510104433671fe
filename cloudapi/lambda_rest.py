"""Lambda Cloud public API v1 over HTTP (contract: shared/reference/lambda-cloud-openapi.json).

Pure `requests`, no Pulumi: the dynamic providers, the trainer's host (cloudapi/hosts.py, which terminates its own
instance from inside it), the reaper and `make status` use it. Facts of the API that shape this client:
- every reply is `{"data": ...}`, every error `{"error": {"code", "message", "suggestion"}}`: callers branch on
  `LambdaError.code`, never on the message;
- 1 request/s in general and one launch per 12 s: a launch waits for `LAUNCH_INTERVAL_S` since the last launch made
  from this process (a second one would only earn a 429); other calls are few, and a 429 is retried with backoff;
- filesystems are listed at /file-systems but created and deleted at /filesystems (the spec's own mismatch).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import requests

from cloudapi.retry import NoAnswer, send

DEFAULT_BASE_URL = "https://cloud.lambda.ai"
BASE_URL_ENV = "LAMBDA_API_BASE_URL"  # ours: tests point it at emulator/lambda_cloud.py
LAUNCH_INTERVAL_S = 12.0  # "launch: 1 request per 12 s"
# An instance in one of these is billed (Lambda bills from launch until terminate; there is no stop state).
BILLED_STATUSES = ("booting", "active", "unhealthy")
GONE_STATUSES = ("terminating", "terminated", "preempted")
INSUFFICIENT_CAPACITY = "instance-operations/launch/insufficient-capacity"
FILESYSTEM_IN_USE = "filesystems/filesystem-in-use"
DUPLICATE = "global/duplicate"

_launch_lock = threading.Lock()
_last_launch = float("-inf")


def base_url_from_environment() -> str:
    return os.environ.get(BASE_URL_ENV, DEFAULT_BASE_URL).rstrip("/")


class LambdaError(RuntimeError):
    """`status` 0: no answer (a timeout or a reset: the request may have been carried out)."""

    def __init__(self, status: int, method: str, path: str, code: str, message: str):
        self.status, self.code = status, code
        super().__init__(f"Lambda Cloud API {method} {path} -> {status} {code}: {message}")


class NotFound(LambdaError):
    pass


class LambdaClient:
    def __init__(self, api_key: str, base_url: str | None = None, retries: int = 6, backoff: float = 1.0,
                 timeout: float = 30.0, launch_interval_s: float = LAUNCH_INTERVAL_S):
        if not api_key:
            raise ValueError("no Lambda Cloud API key: `pulumi config set --secret lambdaApiKey ...` or export LAMBDA_API_KEY")
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = (base_url or base_url_from_environment()).rstrip("/")
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.launch_interval_s = launch_interval_s

    def __repr__(self) -> str:  # never show the key
        return f"LambdaClient({self.base_url})"

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """One call, unwrapped from `data`; retried with backoff (and Retry-After) on 429, 5xx, timeouts, resets.

        Launch callers pass through a client with `retries=0` and make the retry safe themselves (find by name).
        """
        try:
            response = send(self._session, method, self.base_url + path, retries=self.retries, backoff=self.backoff,
                            timeout=self.timeout, json=body)
        except NoAnswer as error:
            raise LambdaError(0, method, path, "no-answer", str(error)) from None
        if response.status_code >= 400:
            code, message = _error(response)
            kind = NotFound if response.status_code == 404 else LambdaError
            raise kind(response.status_code, method, path, code, message)
        return response.json()["data"] if response.content else None

    # instances
    def list_instances(self) -> list[dict]:
        return self.request("GET", "/api/v1/instances")

    def get_instance(self, instance_id: str) -> dict:
        return self.request("GET", f"/api/v1/instances/{instance_id}")

    def rename_instance(self, instance_id: str, name: str) -> dict:
        return self.request("POST", f"/api/v1/instances/{instance_id}", {"name": name})

    def launch(self, body: dict) -> list[str]:
        """The launched instance ids. Waits out the launch rate limit of this process first."""
        global _last_launch
        with _launch_lock:
            wait = _last_launch + self.launch_interval_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            _last_launch = time.monotonic()
            return self.request("POST", "/api/v1/instance-operations/launch", body)["instance_ids"]

    def terminate(self, instance_ids: list[str]) -> list[dict]:
        return self.request("POST", "/api/v1/instance-operations/terminate", {"instance_ids": instance_ids})[
            "terminated_instances"]

    def terminate_if_present(self, instance_id: str) -> None:
        """Idempotent: an instance already gone (404) or going is what we wanted."""
        try:
            self.terminate([instance_id])
        except NotFound:
            pass

    def instance_types(self) -> dict[str, dict]:
        return self.request("GET", "/api/v1/instance-types")

    # filesystems: listed at /file-systems, created and deleted at /filesystems
    def list_filesystems(self) -> list[dict]:
        return self.request("GET", "/api/v1/file-systems")

    def create_filesystem(self, name: str, region: str) -> dict:
        return self.request("POST", "/api/v1/filesystems", {"name": name, "region": region})

    def delete_filesystem(self, filesystem_id: str) -> None:
        try:
            self.request("DELETE", f"/api/v1/filesystems/{filesystem_id}")
        except NotFound:
            pass


def _error(response: requests.Response) -> tuple[str, str]:
    try:
        error = response.json().get("error") or {}
    except ValueError:
        return "unknown", response.text[:300] or response.reason
    message = error.get("message", "")
    if error.get("suggestion"):
        message += f" ({error['suggestion']})"
    return error.get("code", "unknown"), message
