"""Vast.ai REST API over HTTP (contract: shared/reference/vastai-openapi.yaml and vastai-api.md).

Pure `requests`, no Pulumi: the dynamic providers, the trainer's host (cloudapi/hosts.py, which destroys its own
instance with the per-instance CONTAINER_API_KEY), the reaper and `make status` use it. Paths are sent as vast-cli
sends them (`/api/v0/...` with a trailing slash); the base URL comes from VAST_URL, as vast-cli reads it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import requests

from cloudapi.retry import NoAnswer, send

DEFAULT_BASE_URL = "https://console.vast.ai"
LIST_PAGE_SIZE = 25  # the API's maximum for GET /api/v1/instances/
# actual_status values of an instance whose container runs or is about to (null: still provisioning)
LIVE_STATUSES = (None, "loading", "running", "rebooting")


def base_url_from_environment() -> str:
    return os.environ.get("VAST_URL", DEFAULT_BASE_URL).rstrip("/")


class VastError(RuntimeError):
    def __init__(self, status: int, method: str, path: str, detail: str, code: str = ""):
        self.status = status
        self.code = code  # the body's `error` field (no_such_ask, not_found, ...)
        super().__init__(f"Vast.ai API {method} {path} -> {status}: {detail}")


class NotFound(VastError):
    pass


class VastClient:
    def __init__(self, api_key: str, base_url: str | None = None, retries: int = 6, backoff: float = 0.5,
                 timeout: float = 30.0):
        if not api_key:
            raise ValueError("no Vast.ai API key: `pulumi config set --secret vastApiKey ...` or export VAST_API_KEY")
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = (base_url or base_url_from_environment()).rstrip("/")
        self.retries, self.backoff, self.timeout = retries, backoff, timeout

    def __repr__(self) -> str:  # never show the key
        return f"VastClient({self.base_url})"

    def request(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> Any:
        """One call, retried with exponential backoff on 429 (which carries no Retry-After), 5xx, timeouts and
        resets. Creates go through a client with retries=0 and find their own instance before trying again."""
        try:
            response = send(self._session, method, f"{self.base_url}{path}", retries=self.retries,
                            backoff=self.backoff, timeout=self.timeout, json=body, params=params)
        except NoAnswer as error:
            raise VastError(0, method, path, f"unreachable {error}") from None
        if response.status_code >= 400:
            detail, code = _detail(response)
            error_type = NotFound if response.status_code == 404 else VastError
            raise error_type(response.status_code, method, path, detail, code)
        if not response.content:
            return None
        return response.json()

    # offers
    def search_offers(self, query: dict) -> list[dict]:
        return self.request("POST", "/api/v0/bundles/", query)["offers"]

    # instances
    def create_instance(self, offer_id: int, body: dict) -> dict:
        """{"success", "new_contract": <instance id>, "instance_api_key"}."""
        return self.request("PUT", f"/api/v0/asks/{offer_id}/", body)

    def get_instance(self, instance_id: int | str) -> dict:
        """The instance; NotFound when the API answers with none (`{"instances": null}`) or 404."""
        path = f"/api/v0/instances/{instance_id}/"
        instance = self.request("GET", path, params={"owner": "me"}).get("instances")
        if not instance:
            raise NotFound(404, "GET", path, "no such instance")
        return instance

    def list_instances(self, label: str | None = None) -> Iterator[dict]:
        """Every instance of the account (the label's only, when given), page by page (≤25 each)."""
        params: dict[str, Any] = {"limit": LIST_PAGE_SIZE, "order_by": json.dumps([{"col": "id", "dir": "asc"}])}
        if label is not None:
            params["select_filters"] = json.dumps({"label": {"eq": label}})
        while True:
            page = self.request("GET", "/api/v1/instances/", params=params)
            yield from page.get("instances") or []
            token = page.get("next_token")
            if not token:
                return
            params = {**params, "after_token": token}

    def set_state(self, instance_id: int | str, state: str) -> None:
        self.request("PUT", f"/api/v0/instances/{instance_id}/", {"state": state})

    def destroy_instance(self, instance_id: int | str) -> None:
        """Idempotent: an instance already gone is what we wanted."""
        try:
            self.request("DELETE", f"/api/v0/instances/{instance_id}/", {})
        except NotFound:
            pass

    def logs(self, instance_id: int | str, tail: int = 1000, tries: int = 30, interval_s: float = 0.3) -> str:
        """The container log: request_logs gives a URL that serves it once it is ready (vast-cli polls it)."""
        reply = self.request("PUT", f"/api/v0/instances/request_logs/{instance_id}/", {"tail": str(tail)})
        url = reply["result_url"]
        for _ in range(tries):
            response = requests.get(url, timeout=self.timeout)
            if response.status_code == 200:
                return response.text
            time.sleep(interval_s)
        raise VastError(0, "GET", "result_url", f"the log was not ready after {tries} tries")


def _detail(response: requests.Response) -> tuple[str, str]:
    """(text, error code): Vast answers `{"success": false, "error", "msg"}`, sometimes only msg/message/detail,
    and a 429 often as plain text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason, ""
    if not isinstance(body, dict):
        return str(body)[:300], ""
    code = str(body.get("error") or "")
    text = body.get("msg") or body.get("message") or body.get("detail") or code or str(body)
    return (f"{text} ({code})" if code and code != text else str(text)), code
