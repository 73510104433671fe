"""The base of the RunPod dynamic providers: the API key kept out of state, REST v2 clients, retry-safe creates."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pulumi.dynamic import DiffResult

from cloudapi.retry import RETRY_STATUSES, retry_delay
from cloudapi.runpod_rest import RunpodClient, RunpodError
from infra.dynamic import CredentialedProvider, keyed_diff, whole_numbers


class RunpodProvider(CredentialedProvider):
    """The key: `lorastack:runpodApiKey` or RUNPOD_API_KEY (infra.dynamic); the base URL: RUNPOD_API_BASE_URL."""

    credential = "runpodApiKey"
    # each provider's: a change to replace_keys replaces, to update_keys updates in place; integer_keys arrive
    # from Pulumi as floats
    replace_keys: tuple[str, ...]
    update_keys: tuple[str, ...]
    integer_keys: tuple[str, ...]

    def __init__(self, retries: int = 6, backoff: float = 0.5, timeout: float = 30.0):
        super().__init__()
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        olds, news = whole_numbers(olds, self.integer_keys), whole_numbers(news, self.integer_keys)
        return keyed_diff(olds, news, self.replace_keys, self.update_keys)

    def client(self, retries: int | None = None) -> RunpodClient:
        return RunpodClient(
            self.credential_value(),
            retries=self.retries if retries is None else retries,
            backoff=self.backoff,
            timeout=self.timeout,
        )

    def create_once(self, find: Callable[[RunpodClient], dict | None], post: Callable[[RunpodClient], dict]) -> dict:
        """POST without blind retries: before every try, look for what an earlier try may have created.

        RunPod's creates take no idempotency key, and a POST whose answer was lost (a timeout, a reset, a 5xx)
        may still have created the thing. So the POST goes through a client that does not retry, and each retry
        first lists what exists (`find`). The wait before that look grows with each try, to let a slow create
        land first. The look-ups retry transient errors like any other call: a look-up that gave up would leave
        the earlier try's pod billing outside the state (and its volume undeletable).
        """
        lookup, once = self.client(retries=0), self.client(retries=0)
        for attempt in range(self.retries + 1):
            existing = self._look(find, lookup)
            if existing is not None:
                return existing
            try:
                return post(once)
            except RunpodError as error:
                if not is_transient(error) or attempt == self.retries:
                    raise
                if error.status == 0:
                    # no answer: the POST may still be creating on the server; watch for it (twice as long
                    # as we waited for the answer) before posting again
                    landed = self._await_landing(find, lookup)
                    if landed is not None:
                        return landed
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _look(self, find: Callable[[RunpodClient], dict | None], lookup: RunpodClient) -> dict | None:
        for attempt in range(self.retries + 1):
            try:
                return find(lookup)
            except RunpodError as error:
                if not is_transient(error) or attempt == self.retries:
                    raise
            time.sleep(retry_delay(lookup.backoff, attempt))
        raise AssertionError("unreachable")

    def _await_landing(self, find: Callable[[RunpodClient], dict | None], lookup: RunpodClient) -> dict | None:
        deadline = time.monotonic() + 2 * self.timeout
        while time.monotonic() < deadline:
            try:
                existing = find(lookup)
            except RunpodError as error:
                if not is_transient(error):
                    raise
                existing = None  # the API is struggling: keep watching until the deadline
            if existing is not None:
                return existing
            time.sleep(min(1.0, max(self.timeout / 10, 0.05)))
        return self._look(find, lookup)


def is_transient(error: RunpodError) -> bool:
    """No answer (a timeout, a reset), or a status RunPod sends for a request worth repeating."""
    return error.status == 0 or error.status in RETRY_STATUSES
