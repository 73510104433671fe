"""A local dataset folder reaches the network volume through RunPod's S3 API: against a real S3 server (moto, server
mode) on 127.0.0.1, started here, standing in for https://s3api-<dc>.runpod.io."""

from __future__ import annotations

import io
import json
import secrets
from pathlib import Path

import pytest
import yaml

from contract.dataset import folder_content_hash
from emulator.volume_buckets import EMULATOR_KEYS, S3Server, VolumeBuckets
from infra import local_dataset
from infra.runpod_backend import s3 as runpod_s3
from infra.runpod_backend import uploads
from infra.runpod_backend.dataset import DatasetUploadProvider
from infra.stack_files import StackError, parse_stack, stack_file


@pytest.fixture(scope="module")
def endpoint():
    with S3Server() as url:
        yield url


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # contract.dataset's remembered file hashes


@pytest.fixture
def volume(endpoint):
    """A fresh bucket, as RunPod makes one per network volume; (volume id, client)."""
    volume_id = "vol" + secrets.token_hex(4)
    VolumeBuckets(endpoint).create(volume_id)
    return volume_id, runpod_s3.client("EU-RO-1", EMULATOR_KEYS, {runpod_s3.ENDPOINT_ENV: endpoint})


class Requests:
    """The S3 operations a client sends (botocore's before-call events): what went over the wire."""

    def __init__(self, s3):
        self.names: list[str] = []
        s3.meta.events.register("before-call.s3", lambda model, **_: self.names.append(model.name))

    def count(self, name: str) -> int:
        return self.names.count(name)


def make_folder(folder: Path, count: int, size: int = 3000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"img{index:03d}.png").write_bytes(secrets.token_bytes(size))
        (folder / f"img{index:03d}.txt").write_text(f"caption {index}")
    return folder


def objects(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in runpod_s3.list_files(s3, bucket, prefix)}


def test_upload_puts_exactly_the_hashed_files_under_their_hash_and_the_manifest_last(volume, tmp_path):
    volume_id, s3 = volume
    folder = make_folder(tmp_path / "data", 3)
    (folder / ".DS_Store").write_bytes(b"finder")  # hidden: not part of the dataset, not sent
    dataset = uploads.scan(folder)
    assert dataset.content_hash == folder_content_hash(folder)  # the one content hash the trainer and Replicate use
    requests = Requests(s3)

    result = uploads.upload(dataset, s3, volume_id, stream=io.StringIO())

    assert requests.names[-1] == "PutObject" and requests.count("PutObject") == 7  # the manifest after every file
    assert (result.files_sent, result.bytes_sent) == (6, dataset.total_bytes)
    stored = objects(s3, volume_id, dataset.prefix)
    assert {key.removeprefix(dataset.prefix): body for key, body in stored.items()} == {
        path.name: path.read_bytes() for path in folder.iterdir() if not path.name.startswith(".")}
    manifest = json.loads(objects(s3, volume_id, dataset.manifest_key)[dataset.manifest_key])
    assert manifest["contentHash"] == dataset.content_hash and len(manifest["files"]) == 6
    assert dataset.volume_path == f"/workspace/datasets/uploads/{dataset.content_hash}"


def test_a_second_upload_of_the_same_folder_sends_nothing(volume, tmp_path):
    volume_id, s3 = volume
    dataset = uploads.scan(make_folder(tmp_path / "data", 4))
    uploads.upload(dataset, s3, volume_id, stream=io.StringIO())
    requests = Requests(s3)

    again = uploads.upload(uploads.scan(dataset.folder), s3, volume_id, stream=io.StringIO())

    assert again.complete_before and (again.files_sent, again.bytes_sent) == (0, 0)
    assert requests.names == ["GetObject"]  # the manifest, and nothing else


def test_a_changed_folder_is_a_new_hash_and_sends_only_its_new_and_changed_files(volume, tmp_path):
    volume_id, s3 = volume
    folder = make_folder(tmp_path / "data", 5)
    first = uploads.scan(folder)
    uploads.upload(first, s3, volume_id, stream=io.StringIO())
    (folder / "img001.txt").write_text("a new caption")
    (folder / "img009.png").write_bytes(secrets.token_bytes(2000))
    requests = Requests(s3)

    changed = uploads.scan(folder)
    result = uploads.upload(changed, s3, volume_id, stream=io.StringIO())

    assert changed.content_hash != first.content_hash
    assert (result.files_sent, result.files_copied) == (2, 9)
    assert result.bytes_sent == len("a new caption") + 2000
    assert requests.count("PutObject") == 3  # the two files and the manifest; the rest copied on the volume
    stored = objects(s3, volume_id, changed.prefix)
    assert len(stored) == 11 and stored[changed.prefix + "img001.txt"] == b"a new caption"
    assert stored[changed.prefix + "img002.png"] == (folder / "img002.png").read_bytes()
    assert objects(s3, volume_id, first.prefix)[first.prefix + "img001.txt"] == b"caption 1"  # the old run's data stays


def test_an_interrupted_upload_resumes_without_resending_finished_files(volume, tmp_path):
    volume_id, s3 = volume
    dataset = uploads.scan(make_folder(tmp_path / "data", 10))
    puts = []

    def connection_lost(model, **_):
        if model.name == "PutObject":
            puts.append(1)
            if len(puts) > 7:
                raise ConnectionResetError("the network went away")

    s3.meta.events.register("before-call.s3", connection_lost)
    with pytest.raises(ConnectionResetError):
        uploads.upload(dataset, s3, volume_id, stream=io.StringIO())
    s3.meta.events.unregister("before-call.s3", connection_lost)
    finished = runpod_s3.list_files(s3, volume_id, dataset.prefix)
    assert 0 < len(finished) < 20 and not uploads.is_complete(s3, volume_id, dataset)

    result = uploads.upload(dataset, s3, volume_id, stream=io.StringIO())

    assert (result.files_kept, result.files_sent) == (len(finished), 20 - len(finished))
    assert uploads.is_complete(s3, volume_id, dataset)
    assert len(runpod_s3.list_files(s3, volume_id, dataset.prefix)) == 20


def test_large_files_go_in_multipart_parts_and_show_progress(volume, tmp_path):
    volume_id, s3 = volume
    folder = tmp_path / "data"
    folder.mkdir()
    big = secrets.token_bytes(12 * 1024 * 1024)
    (folder / "huge.png").write_bytes(big)
    dataset = uploads.scan(folder)
    requests, progress = Requests(s3), io.StringIO()

    uploads.upload(dataset, s3, volume_id, part_bytes=5 * 1024 * 1024, stream=progress)

    assert requests.count("CreateMultipartUpload") == 1 and requests.count("UploadPart") == 3
    assert s3.get_object(Bucket=volume_id, Key=dataset.prefix + "huge.png")["Body"].read() == big
    assert f"dataset {dataset.content_hash[:12]}: 1/1 files, 12.6 MB of 12.6 MB, " in progress.getvalue()
    assert "MB/s" in progress.getvalue()


def test_directory_keys_and_runpods_multipart_folder_are_not_files(volume, tmp_path):
    """RunPod lists empty directories and its `.s3compat_uploads/` parts; neither counts as an uploaded file."""
    volume_id, s3 = volume
    dataset = uploads.scan(make_folder(tmp_path / "data", 2))
    s3.put_object(Bucket=volume_id, Key=dataset.prefix, Body=b"")
    s3.put_object(Bucket=volume_id, Key=f".s3compat_uploads/{dataset.prefix}img000.png.part1", Body=b"partial")
    assert runpod_s3.list_files(s3, volume_id, "") == {}

    result = uploads.upload(dataset, s3, volume_id, stream=io.StringIO())

    assert result.files_sent == 4


def test_unfinished_multipart_uploads_left_by_an_interruption_are_aborted(volume, tmp_path):
    volume_id, s3 = volume
    dataset = uploads.scan(make_folder(tmp_path / "data", 1))
    s3.create_multipart_upload(Bucket=volume_id, Key=dataset.prefix + "img000.png")

    uploads.upload(dataset, s3, volume_id, stream=io.StringIO())

    assert s3.list_multipart_uploads(Bucket=volume_id).get("Uploads", []) == []


# --- the Pulumi provider -------------------------------------------------------------------------------------------


def provider_props(dataset: uploads.LocalDataset, volume_id: str) -> dict:
    return {"source": str(dataset.folder), "folder": str(dataset.folder), "captionExtension": ".txt",
            "defaultCaption": "", "contentHash": dataset.content_hash, "files": float(dataset.file_count),
            "bytes": float(dataset.total_bytes), "volumeId": volume_id, "dataCenter": "EU-RO-1",
            "volumePath": dataset.volume_path}


def test_provider_create_uploads_with_the_keys_from_the_environment_and_read_finds_it(volume, tmp_path, monkeypatch,
                                                                                      endpoint):
    volume_id, s3 = volume
    monkeypatch.setenv(runpod_s3.ENDPOINT_ENV, endpoint)
    monkeypatch.setenv(runpod_s3.ACCESS_KEY_ENV, "user_test")
    monkeypatch.setenv(runpod_s3.SECRET_KEY_ENV, "rps_test")
    dataset = uploads.scan(make_folder(tmp_path / "data", 2))
    provider = DatasetUploadProvider()

    created = provider.create(provider_props(dataset, volume_id))

    assert created.id == dataset.content_hash
    assert (created.outs["files"], created.outs["bytes"], created.outs["filesSent"]) == (4, dataset.total_bytes, 4)
    assert "rps_test" not in json.dumps(created.outs)
    assert provider.read(created.id, created.outs).id == dataset.content_hash
    assert provider.create(provider_props(dataset, volume_id)).outs["filesSent"] == 0  # a retried create


def test_provider_diff_replaces_on_new_content_or_volume_and_updates_on_a_moved_folder(tmp_path):
    dataset = uploads.scan(make_folder(tmp_path / "data", 1))
    olds = provider_props(dataset, "vol1")
    provider = DatasetUploadProvider()
    assert provider.diff(dataset.content_hash, olds, {**olds, "contentHash": "other"}).replaces == ["contentHash"]
    assert provider.diff(dataset.content_hash, olds, {**olds, "volumeId": "vol2"}).replaces == ["volumeId"]
    moved = provider.diff(dataset.content_hash, olds, {**olds, "folder": "/elsewhere", "source": "/elsewhere"})
    assert moved.changes and not moved.replaces
    assert not provider.diff(dataset.content_hash, olds, dict(olds)).changes


def test_provider_check_and_make_check_refuse_a_missing_folder_naming_the_key(tmp_path):
    dataset = uploads.scan(make_folder(tmp_path / "data", 1))
    props = {**provider_props(dataset, "vol1"), "folder": str(tmp_path / "gone"), "source": str(tmp_path / "gone")}
    failures = DatasetUploadProvider().check({}, props).failures
    assert len(failures) == 1 and "lorastack:train.dataset.source" in failures[0].reason

    raw = yaml.safe_load(stack_file("demo").read_text())["config"]
    raw["lorastack:train"] = {**raw["lorastack:train"], "dataset": {"source": str(tmp_path / "gone")}}
    with pytest.raises(StackError) as refused:
        parse_stack(raw, "stacks/Pulumi.demo.yaml")
    assert "train.dataset.source" in str(refused.value) and "does not exist on this machine" in str(refused.value)


def test_a_local_folder_needs_a_volume_in_a_data_center_with_the_s3_api(tmp_path):
    raw = yaml.safe_load(stack_file("demo").read_text())["config"]
    raw["lorastack:train"] = {**raw["lorastack:train"], "dataset": {"source": str(make_folder(tmp_path / "d", 1))}}
    raw["lorastack:runpod"] = {**raw["lorastack:runpod"], "dataCenter": "US-TX-3"}
    with pytest.raises(StackError) as refused:
        parse_stack(raw, "stacks/Pulumi.demo.yaml")
    assert "serves volumes only in" in str(refused.value) and "US-TX-3" in str(refused.value)


def test_which_sources_are_local_folders(tmp_path):
    (tmp_path / "me" / "style").mkdir(parents=True)
    assert local_dataset.local_folder("/data/style", tmp_path) == Path("/data/style")
    assert local_dataset.local_folder("./style", tmp_path) == tmp_path / "style"
    assert local_dataset.local_folder("me/style", tmp_path) == tmp_path / "me" / "style"  # a folder here wins over the Hub
    assert local_dataset.local_folder("acme/style", tmp_path) is None  # a Hugging Face dataset
    assert local_dataset.local_folder("/workspace/datasets/demo", tmp_path) is None  # already on the volume
    assert local_dataset.local_folder("https://example.com/data.zip", tmp_path) is None
