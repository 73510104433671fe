"""What every lorastack dynamic provider shares: a credential that never enters Pulumi state, and diff helpers.

Pulumi pickles a dynamic provider object into the state (`__provider`), so a credential must never be an
attribute when that happens. The dynamic-provider host unpickles the provider in its own process and then calls
`configure()` with the whole stack config, secrets decrypted: the provider keeps `lorastack:<credential>`
from it, or failing that reads the credential's environment variable (infra.credentials.SECRETS) at call time.
`__getstate__` drops the credential again should a configured provider ever be pickled.
"""

from __future__ import annotations

import os
from typing import Any

from pulumi.dynamic import ConfigureRequest, DiffResult, ResourceProvider
from pulumi.output import Unknown
from pulumi.runtime import rpc

from infra.config import NAMESPACE
from infra.credentials import SECRETS

_CREDENTIAL_ATTRIBUTE = "_credential"


def is_unknown(value: Any) -> bool:
    """During preview an input computed from another resource is not known yet."""
    return isinstance(value, Unknown) or value == rpc.UNKNOWN


def changed_keys(olds: dict[str, Any], news: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if olds.get(key) != news.get(key)]


def keyed_diff(
    olds: dict[str, Any],
    news: dict[str, Any],
    replace_keys: tuple[str, ...],
    update_keys: tuple[str, ...],
    delete_before_replace: bool = False,
) -> DiffResult:
    """A change to one of `replace_keys` replaces the resource; to one of `update_keys`, updates it in place."""
    replaces = changed_keys(olds, news, replace_keys)
    updates = changed_keys(olds, news, update_keys)
    return DiffResult(
        changes=bool(replaces or updates),
        replaces=replaces,
        delete_before_replace=delete_before_replace and bool(replaces),
    )


def whole_numbers(props: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Pulumi hands a provider its numbers as protobuf doubles (10 arrives as 10.0); the APIs want integers."""
    return {
        key: int(value) if key in keys and isinstance(value, float) and value.is_integer() else value
        for key, value in props.items()
    }


class CredentialedProvider(ResourceProvider):
    """A provider whose API credential (`credential`: a key of infra.credentials.SECRETS) stays out of the state."""

    credential: str

    def configure(self, req: ConfigureRequest) -> None:
        value = req.config.get(f"{NAMESPACE}:{self.credential}")
        if value:
            setattr(self, _CREDENTIAL_ATTRIBUTE, value)

    def __getstate__(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if name != _CREDENTIAL_ATTRIBUTE}

    def credential_value(self) -> str:
        return self.__dict__.get(_CREDENTIAL_ATTRIBUTE) or os.environ.get(SECRETS[self.credential], "")
