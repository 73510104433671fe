"""The form of a dataset source that may be written down: a URL without its credentials.

A dataset URL may carry credentials (user:password@, a signed query string such as S3's X-Amz-Signature). The
pod gets the full URL only as a secret variable (ENV_DATASET_SOURCE); its spec, status, logs, LoRA metadata and
model card hold `redacted_source`.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def redacted_source(source: str) -> str:
    """The source without a URL's user:password@, query string and fragment; paths and Hub ids unchanged."""
    if _SCHEME.match(source) is None:
        return source
    parts = urlsplit(source)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
