"""An S3 API on 127.0.0.1 (moto's server mode), for the run mirror's tests: real HTTP, real boto3, no cloud."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def environ(self) -> dict[str, str]:
        """What a machine (or `make fetch`) needs to reach it."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}


@contextmanager
def s3_server(*buckets: str) -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = S3Server(f"http://{host}:{port}")
        # moto keeps its buckets in the process, across servers: each server starts empty, as a fresh bucket would
        import requests

        requests.post(f"{s3.endpoint}/moto-api/reset", timeout=10).raise_for_status()
        for bucket in buckets:
            s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        server.stop()
