"""The emulator's network volumes as RunPod's S3-compatible API shows them: a real S3 server (moto) on 127.0.0.1.

RunPod serves every network volume as a bucket named by the volume id whose keys are the volume's file paths
(shared/reference/runpod-s3-api.md). The emulator keeps a volume as a directory (emulator/pods.py) and moto keeps
buckets in memory, so the two are kept in step at the moments a reader could tell the difference:

- creating a volume creates its bucket (RunPod's S3 API has no CreateBucket: the volume is the bucket), and
  deleting the volume deletes the bucket with everything in it;
- when a pod's container starts, every object of its volume's bucket missing from the directory is copied in:
  the pod sees what `pulumi up` uploaded (a local dataset folder, infra/runpod_backend/uploads.py);
- when a pod's container exits, every file of the directory missing from the bucket, or of another size, is
  copied out: `make fetch` through the S3 API sees what the pod wrote.

What this does not reproduce: a file a running pod writes is visible through RunPod's S3 API at once, here only
once its container has exited (the trainer stops its pod before exiting, so read after the pod has stopped and
its container has ended: ProcessRuntime.wait_until_stopped).

    with S3Server() as endpoint:                 # RUNPOD_S3_ENDPOINT_URL=endpoint for the providers
        runtime = ProcessRuntime(root, volume_buckets=VolumeBuckets(endpoint))
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from infra.runpod_backend import s3 as runpod_s3

# moto takes any key pair; RunPod's access keys are user ids (user_...) and its secrets start rps_
EMULATOR_KEYS = ("user_emulator", "rps_emulator")


class S3Server:
    """moto's S3 in server mode on 127.0.0.1 (a free port); entering gives its endpoint URL."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer  # the dev extra

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.url: str | None = None

    def __enter__(self) -> str:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc_info) -> None:
        self._server.stop()


class VolumeBuckets:
    """Each volume's bucket on the S3 server at `endpoint_url`, mirrored to and from volume directories."""

    def __init__(self, endpoint_url: str, data_center: str = "EU-RO-1"):
        self.endpoint_url, self.data_center = endpoint_url, data_center
        self.s3 = runpod_s3.client(data_center, EMULATOR_KEYS, {runpod_s3.ENDPOINT_ENV: endpoint_url})

    def create(self, volume_id: str) -> None:
        # the region is the data center's (S3 wants a bucket's location named off us-east-1); moto serves a
        # bucket to clients of any region, as one RunPod endpoint serves its data center's volumes
        self.s3.create_bucket(Bucket=volume_id, CreateBucketConfiguration={"LocationConstraint": self.data_center})

    def delete(self, volume_id: str) -> None:
        for key in runpod_s3.list_files(self.s3, volume_id, ""):
            self.s3.delete_object(Bucket=volume_id, Key=key)  # RunPod has no DeleteObjects
        self.s3.delete_bucket(Bucket=volume_id)

    def pull(self, volume_id: str, directory: Path) -> list[str]:
        """Objects missing from `directory` are copied in (each written to a temporary name, then renamed)."""
        copied = []
        for key in runpod_s3.list_files(self.s3, volume_id, ""):
            target = directory / key
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.s3-pull")
            self.s3.download_file(volume_id, key, str(partial))
            os.replace(partial, target)
            copied.append(key)
        return copied

    def push(self, volume_id: str, directory: Path) -> list[str]:
        """Files of `directory` the bucket lacks, or holds at another size, are copied out."""
        present = runpod_s3.list_files(self.s3, volume_id, "")
        copied = []
        for folder, _, files in os.walk(directory):
            for name in files:
                path = Path(folder) / name
                key = path.relative_to(directory).as_posix()
                if not runpod_s3.is_file_key(key) or present.get(key) == path.stat().st_size:
                    continue
                self.s3.upload_file(str(path), volume_id, key)
                copied.append(key)
        return copied
