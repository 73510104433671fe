"""The Replicate dynamic providers' base: the token kept out of state, a client per call, plain outputs.

`ReplicateProvider` says where the token comes from (`lorastack:replicateApiToken` or REPLICATE_API_TOKEN,
through infra.dynamic) and why it never enters the state.
"""

from __future__ import annotations

from typing import Any

from pulumi.dynamic.dynamic import PROVIDER_KEY

from infra.dynamic import CredentialedProvider
from infra.replicate_backend.client import ReplicateClient


def plain_inputs(props: dict[str, Any], secret_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The inputs worth keeping as outputs: not the serialized provider, never a secret."""
    return {key: value for key, value in props.items() if key != PROVIDER_KEY and key not in secret_keys}


class ReplicateProvider(CredentialedProvider):
    """Base of the Replicate providers: a client per call, with the token `lorastack:replicateApiToken` or
    REPLICATE_API_TOKEN (kept out of state: infra.dynamic). The base URL is read from REPLICATE_BASE_URL
    when a client is made (the emulator in tests)."""

    credential = "replicateApiToken"

    def __init__(self, retries: int = 5, backoff: float = 1.0, max_wait: float = 60.0):
        super().__init__()
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait

    def client(self) -> ReplicateClient:
        return ReplicateClient(self.credential_value(), retries=self.retries, backoff=self.backoff, max_wait=self.max_wait)
