"""The base of the Lambda Cloud dynamic providers: the API key kept out of state, clients, retry-safe creates."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pulumi.dynamic import DiffResult

from cloudapi.lambda_rest import LAUNCH_INTERVAL_S, LambdaClient, LambdaError
from cloudapi.retry import RETRY_STATUSES
from infra.dynamic import CredentialedProvider, keyed_diff


class LambdaProvider(CredentialedProvider):
    """The key: `lorastack:lambdaApiKey` or LAMBDA_API_KEY (infra.dynamic); the base URL: LAMBDA_API_BASE_URL."""

    credential = "lambdaApiKey"
    replace_keys: tuple[str, ...]
    update_keys: tuple[str, ...]

    def __init__(self, retries: int = 6, backoff: float = 1.0, timeout: float = 30.0,
                 launch_interval_s: float = LAUNCH_INTERVAL_S):
        super().__init__()
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.launch_interval_s = launch_interval_s

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        return keyed_diff(olds, news, self.replace_keys, self.update_keys, delete_before_replace=True)

    def client(self, retries: int | None = None) -> LambdaClient:
        return LambdaClient(self.credential_value(), retries=self.retries if retries is None else retries,
                            backoff=self.backoff, timeout=self.timeout, launch_interval_s=self.launch_interval_s)

    def create_once(self, find: Callable[[LambdaClient], dict | None], post: Callable[[LambdaClient], dict]) -> dict:
        """POST without blind retries: before every try, look for what an earlier try may have created.

        Lambda's launch and filesystem create take no idempotency key, and one whose answer was lost may still
        have happened (and a second launch would bill a second machine). So the POST goes through a client that
        does not retry; after a 429, a 5xx or no answer, the next try first looks for our resource by name.
        """
        lookup, once = self.client(), self.client(retries=0)
        for attempt in range(self.retries + 1):
            existing = find(lookup)
            if existing is not None:
                return existing
            try:
                return post(once)
            except LambdaError as error:
                if not (error.status == 0 or error.status in RETRY_STATUSES) or attempt == self.retries:
                    raise
                if error.status == 0:  # no answer: the create may still land; watch for it before posting again
                    deadline = time.monotonic() + 2 * self.timeout
                    while time.monotonic() < deadline:
                        existing = find(lookup)
                        if existing is not None:
                            return existing
                        time.sleep(min(1.0, max(self.timeout / 10, 0.05)))
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")
