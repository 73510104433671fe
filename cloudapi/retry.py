"""One vendor API call, tried again with exponential backoff where another try may succeed: on 429 and 5xx (after
the Retry-After a server sends, when longer), on timeouts and on connection resets. The REST clients of this
package (RunPod, Lambda Cloud, Vast.ai) send through it and turn its answer into their own errors."""

from __future__ import annotations

import random
import time
from typing import Any

import requests

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_WAIT_S = 30.0


class NoAnswer(Exception):
    """No response at all after every try (timeouts, resets): the last error, and how many tries were made."""

    def __init__(self, tries: int, error: Exception):
        super().__init__(f"after {tries} tries: {error}")
        self.tries, self.error = tries, error


def retry_delay(backoff: float, attempt: int, retry_after: str | None = None) -> float:
    """Seconds to wait before try `attempt + 1`: backoff * 2^attempt with jitter, at least a numeric Retry-After,
    at most MAX_WAIT_S."""
    delay = backoff * 2**attempt * (0.5 + random.random())
    if retry_after:
        try:
            delay = max(delay, float(retry_after))
        except ValueError:
            pass
    return min(delay, MAX_WAIT_S)


def send(session: requests.Session, method: str, url: str, *, retries: int, backoff: float, timeout: float,
         **options: Any) -> requests.Response:
    """The response of the last try (a retried status once tries are spent); NoAnswer when none came back.
    `options` go to `session.request` (json, params)."""
    for attempt in range(retries + 1):
        try:
            response = session.request(method, url, timeout=timeout, **options)
        except (requests.ConnectionError, requests.Timeout) as error:
            if attempt == retries:
                raise NoAnswer(attempt + 1, error) from None
            time.sleep(retry_delay(backoff, attempt))
            continue
        if response.status_code in RETRY_STATUSES and attempt < retries:
            time.sleep(retry_delay(backoff, attempt, response.headers.get("Retry-After")))
            continue
        return response
    raise AssertionError("unreachable")
