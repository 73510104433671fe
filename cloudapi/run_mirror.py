"""A run's directory mirrored to an S3-compatible bucket: storage that outlives the machine.

Where the platform has no storage that survives a lost host (a Vast.ai volume lives on one machine), the trainer
mirrors its run here: each complete checkpoint as soon as it is written, the run's files (status, history,
samples, the LoRA, DONE) before it stops its machine; a new machine starts by restoring the newest complete
checkpoint and the run's files. Nothing here names a cloud: any S3 API (AWS, R2, B2, MinIO, moto) will do.

The bucket's layout is the volume's (contract/workspace.py) under the URL's prefix:
`<prefix>/runs/<run-id>/checkpoints/step-<n>/...`, `<prefix>/runs/<run-id>/lora/...`. A checkpoint's
trainer.json is uploaded last, as it is written last on disk, so a checkpoint without it is incomplete there too.

The machine's environment: LORASTACK_MIRROR_URL (`s3://bucket/prefix`), LORASTACK_MIRROR_ENDPOINT (empty for
AWS), and boto3's own AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.workspace import RunPaths

ENV_MIRROR_URL = "LORASTACK_MIRROR_URL"
ENV_MIRROR_ENDPOINT = "LORASTACK_MIRROR_ENDPOINT"
CHECKPOINT_MARKER = "trainer.json"  # training/checkpoints.py TRAINER_FILE: written last, the sign of completeness
DONE_FILE = "DONE"
_STEP = re.compile(r"^step-(\d+)$")
_URL = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?$")

Log = Callable[[str], None]


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes) of `s3://bucket/prefix`; ValueError naming what is allowed."""
    match = _URL.match(url)
    if not match:
        raise ValueError(f"{url!r} is not an S3 URL: s3://<bucket>[/<prefix>] (bucket: 3-63 lowercase letters, "
                         "digits, dots and hyphens)")
    return match.group(1), (match.group(2) or "").strip("/")


@dataclass
class RunMirror:
    bucket: str
    prefix: str
    client: Any  # a boto3 S3 client

    @classmethod
    def from_settings(cls, url: str, endpoint: str | None = None, **credentials: str) -> RunMirror:
        import boto3  # only where a mirror is configured

        bucket, prefix = parse_url(url)
        return cls(bucket, prefix, boto3.client("s3", endpoint_url=endpoint or None, **credentials))

    def where(self, paths: RunPaths) -> str:
        return f"s3://{self.bucket}/{self.run_key(paths.run_id)}"

    def run_key(self, run_id: str, relative: str = "") -> str:
        parts = [part for part in (self.prefix, "runs", run_id, relative) if part]
        return "/".join(parts)

    def _keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def _upload(self, path: Path, key: str) -> None:
        self.client.upload_file(str(path), self.bucket, key)

    def _download(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        self.client.download_file(self.bucket, key, str(partial))
        partial.replace(path)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def remote_checkpoints(self, run_id: str) -> list[int]:
        """Steps of the complete checkpoints in the bucket, oldest first."""
        root = self.run_key(run_id, "checkpoints") + "/"
        steps = set()
        for key in self._keys(root):
            name, _, file = key[len(root):].partition("/")
            match = _STEP.match(name)
            if match and file == CHECKPOINT_MARKER:
                steps.add(int(match.group(1)))
        return sorted(steps)

    def push_checkpoint(self, paths: RunPaths, directory: Path) -> None:
        """Upload one complete checkpoint (its marker last), then remove the bucket's checkpoints the volume no
        longer keeps (older than its oldest complete one)."""
        key = self.run_key(paths.run_id, f"checkpoints/{directory.name}")
        files = sorted((file for file in directory.iterdir() if file.is_file()), key=lambda f: f.name == CHECKPOINT_MARKER)
        for file in files:
            self._upload(file, f"{key}/{file.name}")
        kept = [int(m.group(1)) for entry in paths.checkpoints.iterdir()
                if (m := _STEP.match(entry.name)) and (entry / CHECKPOINT_MARKER).is_file()]
        oldest = min(kept, default=0)
        root = self.run_key(paths.run_id, "checkpoints") + "/"
        stale = [k for k in self._keys(root) if (m := _STEP.match(k[len(root):].partition("/")[0])) and int(m.group(1)) < oldest]
        for stale_key in stale:
            self.client.delete_object(Bucket=self.bucket, Key=stale_key)
        self.push_files(paths, ("status.json", "history.jsonl"))

    # -- the run's other files ------------------------------------------------------------------------------
    def push_results(self, paths: RunPaths) -> int:
        """Everything but the checkpoints, before the machine stops (cloudapi.hosts.Mirror)."""
        return self.push_files(paths)

    def push_files(self, paths: RunPaths, names: tuple[str, ...] | None = None) -> int:
        """Upload the run's files outside checkpoints/ (only `names` when given); DONE last. Returns how many."""
        if not paths.run.is_dir():
            return 0
        files = [file for file in paths.run.rglob("*") if file.is_file() and not file.name.endswith(".partial")
                 and file.relative_to(paths.run).parts[0] != "checkpoints"]
        if names is not None:
            files = [file for file in files if str(file.relative_to(paths.run)) in names]
        files.sort(key=lambda file: file.name == DONE_FILE)
        for file in files:
            self._upload(file, self.run_key(paths.run_id, str(file.relative_to(paths.run))))
        return len(files)

    def pull_files(self, run_id: str, destination: Path, include_checkpoints: bool = False) -> int:
        """Download the run's files (not its checkpoints unless asked) into `destination`; returns how many."""
        root = self.run_key(run_id) + "/"
        count = 0
        for key in self._keys(root):
            relative = key[len(root):]
            if not include_checkpoints and relative.startswith("checkpoints/"):
                continue
            self._download(key, destination / relative)
            count += 1
        return count

    def restore(self, paths: RunPaths, log: Log) -> None:
        """A fresh machine: bring the run's files and its newest complete checkpoint from the bucket, unless the
        volume already has a checkpoint as new (the same machine started again)."""
        remote = self.remote_checkpoints(paths.run_id)
        local = [int(m.group(1)) for entry in (paths.checkpoints.iterdir() if paths.checkpoints.is_dir() else [])
                 if (m := _STEP.match(entry.name)) and (entry / CHECKPOINT_MARKER).is_file()]
        if local and (not remote or max(local) >= remote[-1]):
            return
        pulled = self.pull_files(paths.run_id, paths.run)
        if remote:
            step = remote[-1]
            final = paths.checkpoints / f"step-{step}"
            temp = paths.checkpoints / f".tmp-step-{step}"
            shutil.rmtree(temp, ignore_errors=True)
            prefix = self.run_key(paths.run_id, f"checkpoints/step-{step}") + "/"
            keys = sorted(self._keys(prefix), key=lambda key: key.endswith("/" + CHECKPOINT_MARKER))
            for key in keys:
                self._download(key, temp / key[len(prefix):])
            shutil.rmtree(final, ignore_errors=True)
            temp.rename(final)
            log(f"restored checkpoint step-{step} and {pulled} run files from s3://{self.bucket}/{self.run_key(paths.run_id)}")
        elif pulled:
            log(f"restored {pulled} run files from s3://{self.bucket}/{self.run_key(paths.run_id)}")


def bucket_mirror_from_environment(environ: Mapping[str, str]) -> RunMirror | None:
    """The machine's mirror when LORASTACK_MIRROR_URL is set; credentials come from boto3's own variables."""
    url = environ.get(ENV_MIRROR_URL)
    if not url:
        return None
    credentials = {name.lower(): environ[variable] for name, variable in (
        ("aws_access_key_id", "AWS_ACCESS_KEY_ID"), ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
        ("region_name", "AWS_DEFAULT_REGION")) if environ.get(variable)}
    return RunMirror.from_settings(url, environ.get(ENV_MIRROR_ENDPOINT), **credentials)
