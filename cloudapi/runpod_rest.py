"""RunPod REST API v2 over HTTP (contract: shared/reference/runpod-rest-v2-openapi.json).

Pure `requests`, no Pulumi: the dynamic providers, the trainer's host (cloudapi/hosts.py, which stops its own pod
from inside it), the reaper and `make status` all use it. The `runpod` SDK is not a dependency: it speaks GraphQL,
pastes env values into the query text unescaped, and cannot manage network volumes, so it would be the wrong tool
for every call made here (pods, network volumes, the catalog, the log stream); nothing imported it, and its pin
is dropped from pyproject.toml.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import requests

from cloudapi.retry import NoAnswer, send

DEFAULT_BASE_URL = "https://api.runpod.io"
# A pod in one of these has a container that runs (or is about to): its trainer is alive and it bills its GPU.
LIVE_POD_STATUSES = ("PROVISIONING", "STARTING", "RUNNING")


def base_url_from_environment() -> str:
    # RUNPOD_API_BASE_URL is the runpod SDK's own variable; tests point it at emulator/.
    return os.environ.get("RUNPOD_API_BASE_URL", DEFAULT_BASE_URL).rstrip("/")


class RunpodError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, detail: str):
        self.status = status
        super().__init__(f"RunPod API {method} {path} -> {status}: {detail}")


class NotFound(RunpodError):
    pass


class RunpodClient:
    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        retries: int = 6,
        backoff: float = 0.5,
        timeout: float = 30.0,
    ):
        if not api_key:
            raise ValueError(
                "no RunPod API key: `pulumi config set --secret runpodApiKey ...` or export RUNPOD_API_KEY"
            )
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = (base_url or base_url_from_environment()).rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout

    def __repr__(self) -> str:  # never show the key
        return f"RunpodClient({self.base_url})"

    def request(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> Any:
        """One call, retried with exponential backoff (and Retry-After) on 429, 5xx, timeouts and resets.

        POST is retried too: the emulator and RunPod answer a rejected request before creating anything,
        and callers that create make the retry safe by finding their own resource by name first.
        """
        try:
            response = send(self._session, method, f"{self.base_url}{path}", retries=self.retries,
                            backoff=self.backoff, timeout=self.timeout, json=body, params=params)
        except NoAnswer as error:
            raise RunpodError(0, method, path, f"unreachable {error}") from None
        if response.status_code == 404:
            raise NotFound(404, method, path, _detail(response))
        if response.status_code >= 400:
            raise RunpodError(response.status_code, method, path, _detail(response))
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # pods
    def list_pods(self) -> list[dict]:
        return self.request("GET", "/v2/pods")["pods"]

    def get_pod(self, pod_id: str) -> dict:
        return self.request("GET", f"/v2/pods/{pod_id}")

    def create_pod(self, body: dict) -> dict:
        return self.request("POST", "/v2/pods", body)

    def update_pod(self, pod_id: str, body: dict) -> dict:
        return self.request("PATCH", f"/v2/pods/{pod_id}", body)

    def pod_action(self, pod_id: str, action: str) -> dict:
        return self.request("POST", f"/v2/pods/{pod_id}/action", {"action": action})

    def terminate_pod(self, pod_id: str) -> None:
        """Idempotent: a pod that is already gone is what we wanted."""
        try:
            self.request("DELETE", f"/v2/pods/{pod_id}")
        except NotFound:
            pass

    def pod_logs(self, pod_id: str, tail: int = 100) -> Iterator[dict]:
        """The log lines as dicts (ts, source, line), from the v2 Server-Sent Events stream."""
        import json

        url = f"{self.base_url}/v2/pods/{pod_id}/logs"
        with self._session.get(url, params={"tail": tail}, stream=True, timeout=self.timeout) as response:
            if response.status_code >= 400:
                raise RunpodError(response.status_code, "GET", f"/v2/pods/{pod_id}/logs", _detail(response))
            for raw in _lines_as_they_arrive(response.raw):
                if raw.startswith("data:"):
                    yield json.loads(raw[5:].strip())

    # network volumes
    def list_volumes(self) -> list[dict]:
        return self.request("GET", "/v2/network-volumes")["networkVolumes"]

    def get_volume(self, volume_id: str) -> dict:
        return self.request("GET", f"/v2/network-volumes/{volume_id}")

    def create_volume(self, body: dict) -> dict:
        return self.request("POST", "/v2/network-volumes", body)

    def update_volume(self, volume_id: str, body: dict) -> dict:
        return self.request("PATCH", f"/v2/network-volumes/{volume_id}", body)

    def delete_volume(self, volume_id: str) -> None:
        try:
            self.request("DELETE", f"/v2/network-volumes/{volume_id}")
        except NotFound:
            pass

    # catalog
    def gpu_types(self) -> list[dict]:
        return self.request("GET", "/v2/catalog/gpus")["gpus"]

    def data_centers(self) -> list[dict]:
        return self.request("GET", "/v2/catalog/datacenters")["dataCenters"]


def _lines_as_they_arrive(raw: Any) -> Iterator[str]:
    """Lines of a streamed body as soon as each is complete. `iter_lines()` reads fixed-size chunks and so holds
    back the last lines of a live stream until more bytes come; `read1` returns whatever has arrived."""
    from urllib3.exceptions import ProtocolError, ReadTimeoutError

    pending = b""
    while True:
        try:  # the exceptions requests' own iter_lines raises, so callers catch one family
            chunk = raw.read1(65536)
        except ReadTimeoutError as error:
            raise requests.ConnectionError(error) from None
        except ProtocolError as error:
            raise requests.exceptions.ChunkedEncodingError(error) from None
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if pending:
        yield pending.decode("utf-8", errors="replace")


def _detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason
    detail = body.get("detail") or body.get("title") or str(body)
    errors = body.get("errors")
    return f"{detail} ({'; '.join(errors)})" if errors else detail
