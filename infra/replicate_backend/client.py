"""A thin wrapper around `replicate.Client` (1.0.7) that adds what lorastack needs and the client lacks.

- Writes are retried. The client's transport retries 429/503/504 on GET/PUT/DELETE only; a POST or PATCH
  that meets a 429 or a 5xx fails at once. `WriteRetryTransport` retries those with exponential backoff,
  honouring Retry-After. Creates are the exception (`create_once`): an answer lost after the server acted
  (a 500/502/504, a read timeout, a reset connection) may hide a training, model, deployment or file that was
  made, so a create is posted again only after looking for what the earlier try made. The look-ups retry
  transient failures themselves (`retrying`): giving up there would post a duplicate or leave one unseen.
- `get_training`/`cancel_training` return the API's JSON: the client's `Training` model refuses the
  `aborted` status the API sends for a training ended before it ran.
- `delete_version` treats the API's 202 as success (`versions.delete` reports False for it).

The token goes into the client's Authorization header and nowhere else: not into messages, not into repr.
No Pulumi here: the providers' base, which makes these clients, is infra/replicate_backend/provider.py.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import replicate
from replicate.exceptions import ReplicateError
from replicate.version import Versions

WRITE_METHODS = frozenset({"POST", "PATCH"})
# Rejected before any work was done: safe to send again whatever the request.
UNPROCESSED_STATUSES = frozenset({429, 503})
# The server may have acted before failing: safe to repeat only for requests that cannot duplicate work.
AMBIGUOUS_STATUSES = frozenset({500, 502, 504})
T = TypeVar("T")


def answer_lost(error: Exception) -> bool:
    """The request may have been carried out although its answer never came: a 5xx, a timeout, a reset."""
    if isinstance(error, ReplicateError):
        return error.status in AMBIGUOUS_STATUSES
    return isinstance(error, httpx.TransportError)


def transient(error: Exception) -> bool:
    """Worth the same request again: refused before any work (429/503), or an answer lost on the way."""
    return answer_lost(error) or (isinstance(error, ReplicateError) and error.status in UNPROCESSED_STATUSES)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: a number (fractions accepted) or an HTTP date. None when absent or unreadable."""
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class WriteRetryTransport(httpx.BaseTransport):
    """Retries POST/PATCH on `statuses`, waiting Retry-After when given, else exponential backoff with jitter."""

    def __init__(self, wrapped: httpx.BaseTransport, statuses: frozenset[int], retries: int, backoff: float, max_wait: float):
        self.wrapped = wrapped
        self.statuses = statuses
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.wrapped.handle_request(request)
        attempt = 0
        while request.method in WRITE_METHODS and response.status_code in self.statuses and attempt < self.retries:
            response.read()
            wait = retry_after_seconds(response.headers.get("Retry-After"))
            if wait is None:
                wait = self.backoff * 2**attempt * random.uniform(0.9, 1.1)  # jitter, not crypto
            response.close()
            time.sleep(min(wait, self.max_wait))
            attempt += 1
            response = self.wrapped.handle_request(request)  # bodies (JSON, multipart files) replay from the start
        return response

    def close(self) -> None:
        self.wrapped.close()


class ReplicateClient:
    """`sdk` is the plain `replicate.Client` (with write retries); the methods add what it lacks."""

    def __init__(self, token: str, base_url: str | None = None, *, retries: int = 5, backoff: float = 1.0,
                 max_wait: float = 60.0):
        if not token:
            raise ValueError(
                "no Replicate API token: run `pulumi config set --secret replicateApiToken r8_...` "
                "or export REPLICATE_API_TOKEN"
            )
        self.base_url = base_url or os.environ.get("REPLICATE_BASE_URL") or "https://api.replicate.com"
        self.retries = retries
        self.backoff = backoff

        def client(statuses: frozenset[int]) -> replicate.Client:
            transport = WriteRetryTransport(httpx.HTTPTransport(), statuses, retries, backoff, max_wait)
            return replicate.Client(api_token=token, base_url=self.base_url, transport=transport)

        self.sdk = client(UNPROCESSED_STATUSES | AMBIGUOUS_STATUSES)
        self.sdk_once = client(UNPROCESSED_STATUSES)  # for creates: see create_once

    def __repr__(self) -> str:
        return f"ReplicateClient(base_url={self.base_url!r})"

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """A request through the client's HTTP layer (auth, retries, errors as ReplicateError), JSON back."""
        response = self.sdk._request(method, path, **kwargs)
        return response.json() if response.content else None

    def get_training(self, training_id: str) -> dict:
        return self.json("GET", f"/v1/trainings/{training_id}")

    def cancel_training(self, training_id: str) -> dict:
        return self.json("POST", f"/v1/trainings/{training_id}/cancel")

    def post_once(self, path: str, body: dict[str, Any], **kwargs: Any) -> Any:
        """One POST that is never repeated blindly (429/503, refused before any work, are retried)."""
        response = self.sdk_once._request("POST", path, json=body, **kwargs)
        return response.json() if response.content else None

    def retrying(self, call: Callable[[], T]) -> T:
        """`call` (a read) again after a transient failure, with the client's backoff."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except (ReplicateError, httpx.TransportError) as error:
                if not transient(error) or attempt == self.retries:
                    raise
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def create_once(self, post: Callable[[], T], find: Callable[[], T | None]) -> T:
        """`post` a create; after a lost answer, `find` what that try made (retrying the look-up itself through
        transient failures) and post again only when nothing was made."""
        for attempt in range(self.retries + 1):
            try:
                return post()
            except (ReplicateError, httpx.TransportError) as error:
                if not answer_lost(error) or attempt == self.retries:
                    raise
            time.sleep(self.backoff * 2**attempt)
            made = self.retrying(find)
            if made is not None:
                return made
        raise AssertionError("unreachable")

    def create_training(self, trainer: str, version: str, destination: str, training_input: dict[str, Any]) -> dict:
        """POST a training, unless one with these settings is still running (started by an earlier `up` whose
        answer was lost); after a lost answer, adopt the training the failed try started, if there is one."""
        owner, name = trainer.split("/", 1)
        path = f"/v1/models/{owner}/{name}/versions/{version}/trainings"
        body = {"destination": destination, "input": training_input}
        earlier = self.retrying(lambda: self._same_trainings(version, destination, training_input))
        running = next((t for t in earlier if t.get("status") in ("starting", "processing")), None)
        if running is not None:
            return running
        seen = {t["id"] for t in earlier}

        def find() -> dict | None:
            return next((t for t in self._same_trainings(version, destination, training_input) if t["id"] not in seen), None)

        return self.create_once(lambda: self.post_once(path, body), find)

    def _same_trainings(self, version: str, destination: str, training_input: dict[str, Any]) -> list[dict]:
        """Trainings of this trainer version into this destination with this very input, newest first (the
        first page: a try from seconds ago, or a training still running, is there)."""
        page = self.json("GET", "/v1/trainings")
        return [t for t in page.get("results", [])
                if t.get("version") == version and t.get("destination") == destination and t.get("input") == training_input]

    def update_model(self, owner: str, name: str, **fields: Any) -> dict:
        """PATCH /v1/models/{owner}/{name} (description, readme, urls): the client has no call for it."""
        return self.json("PATCH", f"/v1/models/{owner}/{name}", json=fields)

    def list_versions(self, model: str) -> list[dict]:
        owner, name = model.split("/", 1)
        return self.json("GET", f"/v1/models/{owner}/{name}/versions").get("results", [])

    def delete_version(self, model: str, version_id: str) -> None:
        """Delete a version (202: accepted); a version already gone is what was asked for."""
        try:
            Versions(self.sdk, model).delete(version_id)  # reports False on its 202 success: ignored
        except ReplicateError as error:
            if error.status != 404:
                raise

    def find_file(self, sha256: str) -> dict | None:
        """An uploaded, unexpired file with this content, so the same dataset is uploaded once."""
        now = datetime.now(UTC)
        for file in self.retrying(lambda: self.json("GET", "/v1/files")).get("results", []):
            expires = file.get("expires_at")
            if file.get("checksums", {}).get("sha256") != sha256:
                continue
            if expires and datetime.fromisoformat(expires.replace("Z", "+00:00")) <= now:
                continue
            return file
        return None
