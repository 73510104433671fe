"""DatasetUpload: a local dataset folder on the network volume, as a Pulumi dynamic resource (uploads.py does the work).

Its id is the dataset's content hash, and its inputs (what the preview shows) are that hash, the file count and
the bytes, the folder here and the folder on the volume. A new hash or a new volume is a new upload (replace);
the same content from a moved folder changes nothing on the volume (update). `create` is safe to retry and
resumes an interrupted upload (uploads.upload). `delete` leaves the files: datasets outlive `pulumi destroy`,
like the volume that holds them, and go when the volume goes.

The S3 key pair, like the RunPod API key (infra/dynamic.py), never enters the state: `configure()` keeps
`lorastack:runpodS3AccessKey` / `lorastack:runpodS3Secret` from the stack config, else the environment variables
are read at call time, and `__getstate__` drops them should a configured provider be pickled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    ConfigureRequest,
    CreateResult,
    DiffResult,
    ReadResult,
    ResourceProvider,
    UpdateResult,
)
from pulumi.dynamic.dynamic import PROVIDER_KEY

from contract.dataset import DatasetError
from infra.config import NAMESPACE
from infra.dynamic import is_unknown, keyed_diff, whole_numbers
from infra.runpod_backend import s3 as runpod_s3
from infra.runpod_backend import uploads

REPLACE_KEYS = ("contentHash", "volumeId")  # other content, or another volume: another upload
UPDATE_KEYS = ("source", "folder")  # the same content found elsewhere here: nothing to send
INTEGER_KEYS = ("files", "bytes", "filesSent", "bytesSent")
_KEYS_ATTRIBUTE = "_s3_keys"


class DatasetUploadProvider(ResourceProvider):
    """Inputs: source, folder, captionExtension, defaultCaption, contentHash, files, bytes, volumeId, dataCenter,
    volumePath. Outputs add filesSent and bytesSent (what the create that made it sent)."""

    def configure(self, req: ConfigureRequest) -> None:
        access = req.config.get(f"{NAMESPACE}:{runpod_s3.ACCESS_KEY}")
        secret = req.config.get(f"{NAMESPACE}:{runpod_s3.SECRET_KEY}")
        if access and secret:
            setattr(self, _KEYS_ATTRIBUTE, (access, secret))

    def __getstate__(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if name != _KEYS_ATTRIBUTE}

    def _client(self, data_center: str):
        keys = self.__dict__.get(_KEYS_ATTRIBUTE) or runpod_s3.keys_from(os.environ)
        if keys is None:
            raise pulumi.RunError(
                "a local dataset is uploaded through RunPod's S3 API, which needs an S3 API key (RunPod console > "
                f"Settings > S3 API Keys): `pulumi config set --secret {runpod_s3.ACCESS_KEY} user_...` and "
                f"`pulumi config set --secret {runpod_s3.SECRET_KEY} rps_...`, or export {runpod_s3.ACCESS_KEY_ENV} "
                f"and {runpod_s3.SECRET_KEY_ENV}"
            )
        return runpod_s3.client(data_center, keys, os.environ)

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        news = whole_numbers(news, INTEGER_KEYS)
        failures = []
        folder = news.get("folder")
        if not is_unknown(folder) and not (isinstance(folder, str) and Path(folder).is_dir()):
            failures.append(CheckFailure(
                "folder", f"lorastack:train.dataset.source = {news.get('source')!r}: {folder} is not a folder on "
                          "this machine (a local dataset is uploaded from here to the network volume)"))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        return keyed_diff(whole_numbers(olds, INTEGER_KEYS), whole_numbers(news, INTEGER_KEYS), REPLACE_KEYS, UPDATE_KEYS)

    def create(self, props: dict[str, Any]) -> CreateResult:
        props = whole_numbers(props, INTEGER_KEYS)
        caption_extension, default_caption = props.get("captionExtension") or ".txt", props.get("defaultCaption") or ""
        dataset = uploads.scan(Path(props["folder"]), caption_extension, default_caption)
        if dataset.content_hash != props["contentHash"]:
            raise DatasetError(f"{dataset.folder}: its files changed since the preview (content hash "
                               f"{props['contentHash'][:16]} is now {dataset.content_hash[:16]}); run `pulumi up` again")
        result = uploads.upload(dataset, self._client(props["dataCenter"]), props["volumeId"],
                                caption_extension=caption_extension, default_caption=default_caption)
        return CreateResult(dataset.content_hash, _outputs(props, result.files_sent, result.bytes_sent))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        """Gone when the volume no longer holds a complete upload (its manifest), e.g. the volume was deleted."""
        props = whole_numbers(props, INTEGER_KEYS)
        dataset = uploads.LocalDataset(Path(props["folder"]), id_, ())
        from botocore.exceptions import ClientError

        try:
            complete = uploads.is_complete(self._client(props["dataCenter"]), props["volumeId"], dataset)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "NoSuchBucket":  # the volume itself is gone
                raise
            complete = False
        return ReadResult(id_, props) if complete else ReadResult("", {})

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        news = whole_numbers(news, INTEGER_KEYS)
        return UpdateResult(_outputs(news, 0, 0))  # the content on the volume is the same: nothing to send

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        """Nothing: the files stay with the volume (see the module docstring)."""


def _outputs(props: dict[str, Any], files_sent: int, bytes_sent: int) -> dict[str, Any]:
    inputs = {key: value for key, value in props.items() if key != PROVIDER_KEY}
    return {**inputs, "filesSent": files_sent, "bytesSent": bytes_sent}


@dataclass
class DatasetUploadArgs:
    source: str  # train.dataset.source as the stack file writes it
    dataset: uploads.LocalDataset
    caption_extension: str
    default_caption: str
    volume_id: pulumi.Input[str]
    data_center: str


class DatasetUpload(pulumi.dynamic.Resource, module="runpod", name="DatasetUpload"):
    contentHash: pulumi.Output[str]
    files: pulumi.Output[int]
    bytes: pulumi.Output[int]
    volumePath: pulumi.Output[str]
    filesSent: pulumi.Output[int]
    bytesSent: pulumi.Output[int]

    def __init__(self, resource_name: str, args: DatasetUploadArgs, opts: pulumi.ResourceOptions | None = None):
        dataset = args.dataset
        props = {
            "source": args.source,
            "folder": str(dataset.folder),
            "captionExtension": args.caption_extension,
            "defaultCaption": args.default_caption,
            "contentHash": dataset.content_hash,
            "files": dataset.file_count,
            "bytes": dataset.total_bytes,
            "volumeId": args.volume_id,
            "dataCenter": args.data_center,
            "volumePath": dataset.volume_path,
            "filesSent": None,
            "bytesSent": None,
        }
        super().__init__(DatasetUploadProvider(), resource_name, props, opts)
