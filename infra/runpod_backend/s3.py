"""RunPod's S3-compatible API for network volumes (shared/reference/runpod-s3-api.md): one client, one listing.

The bucket is the volume id, a key is a file's path on the volume, the region is the data center id and the
endpoint is per data center (`https://s3api-<dc>.runpod.io`; RUNPOD_S3_ENDPOINT_URL overrides it, for tests and
data centers not listed yet). Requests are SigV4 with path-style addressing, as RunPod's own examples set them.
The key pair is `lorastack:runpodS3AccessKey` / `lorastack:runpodS3Secret` (stack secrets) or the environment
variables infra.credentials.SECRETS names for them; neither is ever printed.
"""

from __future__ import annotations

from collections.abc import Mapping

from infra.credentials import SECRETS

ACCESS_KEY = "runpodS3AccessKey"  # secret config keys (infra.credentials.SECRETS)
SECRET_KEY = "runpodS3Secret"
ACCESS_KEY_ENV = SECRETS[ACCESS_KEY]
SECRET_KEY_ENV = SECRETS[SECRET_KEY]
ENDPOINT_ENV = "RUNPOD_S3_ENDPOINT_URL"
# RunPod takes parts up to 500 MB; users report that the AWS CLI's 8 MB parts (thousands of them) fail at
# CompleteMultipartUpload and that 64 MB parts work.
PART_BYTES = 64 * 1024 * 1024
# Data centers whose volumes RunPod's S3 API serves (s3-api.mdx, 2026-08-20; not machine-readable anywhere)
S3_DATA_CENTERS = (
    "EU-CZ-1", "EU-RO-1", "EUR-IS-1", "EUR-NO-1", "US-CA-2", "US-GA-2", "US-IL-1", "US-KS-2", "US-MD-1", "US-MO-1",
    "US-MO-2", "US-NC-1", "US-NC-2", "US-NE-1", "US-WA-1",
)
MULTIPART_UPLOADS_DIR = ".s3compat_uploads/"  # RunPod keeps unfinished multipart parts here, and lists it


def endpoint(data_center: str, environ: Mapping[str, str]) -> str:
    return environ.get(ENDPOINT_ENV) or f"https://s3api-{data_center.lower()}.runpod.io"


def keys_from(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(access key, secret) from the environment, or None when either is missing."""
    access, secret = environ.get(ACCESS_KEY_ENV), environ.get(SECRET_KEY_ENV)
    return (access, secret) if access and secret else None


def client(data_center: str, keys: tuple[str, str], environ: Mapping[str, str], make_client=None):
    """A boto3 S3 client for the volumes of one data center."""
    from botocore.config import Config

    if make_client is None:
        import boto3  # the infra extra

        make_client = boto3.client
    access, secret = keys
    return make_client(
        "s3",
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name=data_center,  # RunPod's S3 API takes the data center id as the region
        endpoint_url=endpoint(data_center, environ),
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            # RunPod advises standard retries with 10 attempts against its 502s, and long reads: a large
            # CompleteMultipartUpload can take minutes to answer
            retries={"mode": "standard", "max_attempts": 10},
            read_timeout=900,
        ),
    )


def is_file_key(key: str) -> bool:
    """RunPod lists empty directories as keys ending in "/" and its unfinished multipart parts: neither is a file."""
    return not key.endswith("/") and not key.startswith(MULTIPART_UPLOADS_DIR) and f"/{MULTIPART_UPLOADS_DIR}" not in key


def list_files(s3, bucket: str, prefix: str) -> dict[str, int]:
    """{key: size} of every file under `prefix` (ListObjectsV2, all pages)."""
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if is_file_key(item["Key"]):
                found[item["Key"]] = item.get("Size", 0)
    return found
