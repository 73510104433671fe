"""contract.dataset: the one dataset content hash (and its remembered file hashes), source kinds, redaction.
Torch-free, as infra imports it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contract import dataset as contract_dataset
from contract.dataset import (
    DatasetError,
    classify_source,
    dataset_files,
    folder_content_hash,
    with_redacted_source,
)
from contract.redaction import redacted_source
from contract.spec import TrainSpec

ROOT = Path(__file__).resolve().parent.parent


def make_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"jpeg bytes a")
    (root / "a.txt").write_text("a red card")
    (root / "sub").mkdir()
    (root / "sub" / "b.PNG").write_bytes(b"png bytes b")
    (root / "sub" / "metadata.jsonl").write_text('{"file_name": "b.PNG", "text": "a blue card"}\n')
    return root


@pytest.fixture
def quick_cache(monkeypatch):
    """File hashes are remembered at once (not only for files older than a couple of seconds)."""
    monkeypatch.setattr(contract_dataset, "_RACY_SECONDS", 0.0)


def test_the_files_are_images_their_captions_and_metadata_without_hidden_or_macos_side_files(tmp_path):
    folder = make_folder(tmp_path / "data")
    (folder / ".hidden.jpg").write_bytes(b"x")
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._a.jpg").write_bytes(b"x")
    (folder / "notes.md").write_text("not a caption")
    files = dataset_files(folder)
    assert files.images == ("a.jpg", "sub/b.PNG")
    assert files.captions == {"a.jpg": "a.txt"}
    assert files.metadata == ("sub/metadata.jsonl",)


def test_content_hash_depends_on_paths_and_bytes_only(tmp_path, quick_cache):
    first = folder_content_hash(make_folder(tmp_path / "one"), cache_dir=tmp_path / "cache")
    copy = make_folder(tmp_path / "two")
    os.utime(copy / "a.jpg", ns=(10**18, 10**18))
    (copy / "ignored.md").write_text("not part of the dataset")
    assert folder_content_hash(copy, cache_dir=tmp_path / "cache") == first  # another place, other times

    for index, change in enumerate((
        lambda f: (f / "a.txt").write_text("a green card"),  # a caption
        lambda f: (f / "sub" / "b.PNG").write_bytes(b"png bytes c"),  # an image's bytes, same size
        lambda f: (f / "sub" / "b.PNG").rename(f / "sub" / "c.PNG"),  # a name
        lambda f: (f / "sub" / "metadata.jsonl").write_text("{}\n"),  # imagefolder captions
    )):
        changed = make_folder(tmp_path / f"changed-{index}")
        change(changed)
        assert folder_content_hash(changed, cache_dir=tmp_path / "cache") != first
    assert folder_content_hash(copy, default_caption="a card", cache_dir=tmp_path / "cache") != first


def test_a_second_look_at_an_unchanged_folder_reads_no_file(tmp_path, monkeypatch, quick_cache):
    folder = make_folder(tmp_path / "data")
    first = folder_content_hash(folder, cache_dir=tmp_path / "cache")
    read = []
    real_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda handle, name: read.append(handle.name) or real_digest(handle, name))
    assert folder_content_hash(folder, cache_dir=tmp_path / "cache") == first
    assert read == []

    # the same size and the same mtime, new bytes: the inode change time still gives it away
    stat = (folder / "a.jpg").stat()
    (folder / "a.jpg").write_bytes(b"jpeg bytes z")
    os.utime(folder / "a.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert folder_content_hash(folder, cache_dir=tmp_path / "cache") != first
    assert read == [str(folder / "a.jpg")]


def test_files_changed_moments_ago_are_hashed_every_time(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "data")  # written just now: a coarse clock could hide a second write
    folder_content_hash(folder, cache_dir=tmp_path / "cache")
    read = []
    real_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda handle, name: read.append(handle.name) or real_digest(handle, name))
    folder_content_hash(folder, cache_dir=tmp_path / "cache")
    assert len(read) == 4


def test_a_damaged_hash_cache_only_costs_a_rehash(tmp_path, quick_cache):
    folder = make_folder(tmp_path / "data")
    first = folder_content_hash(folder, cache_dir=tmp_path / "cache")
    for cache_file in (tmp_path / "cache").iterdir():
        cache_file.write_text('{"format": 1, "files": {"a.jpg": [1, 2')
    assert folder_content_hash(folder, cache_dir=tmp_path / "cache") == first


def test_a_file_name_that_is_not_utf8_is_named_in_the_error(tmp_path):
    folder = make_folder(tmp_path / "data")
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"caf.\.jpg: the file name is not valid UTF-8"):
        folder_content_hash(folder, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("https://user:s3cret@example.com/data.zip", "https://example.com/data.zip"),
        ("https://bucket.s3.amazonaws.com/d.tar.gz?X-Amz-Signature=abc&X-Amz-Credential=key", "https://bucket.s3.amazonaws.com/d.tar.gz"),
        ("http://token@[::1]:8080/d.zip#frag", "http://[::1]:8080/d.zip"),
        ("/workspace/datasets/mine", "/workspace/datasets/mine"),
        ("someone/cards", "someone/cards"),
    ],
)
def test_redacted_source_drops_credentials_and_signed_queries(source, shown):
    assert redacted_source(source) == shown


def test_a_spec_with_its_source_redacted_keeps_everything_else():
    raw = {"family": "sdxl", "baseModel": "m", "dataset": {"source": "https://u:p@h.example/d.zip?sig=x", "repeats": 3}}
    spec = TrainSpec.model_validate(raw)
    redacted = with_redacted_source(spec)
    assert redacted.dataset.source == "https://h.example/d.zip" and redacted.dataset.repeats == 3
    assert "sig=x" not in redacted.to_env_json() and "u:p" not in redacted.to_env_json()
    assert redacted.model_dump(exclude={"dataset"}) == spec.model_dump(exclude={"dataset"})
    assert spec.dataset.source == raw["dataset"]["source"]  # the pod still gets the URL it downloads


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("https://example.com/data.zip", "url"),
        ("http://127.0.0.1:8000/d.tar.gz", "url"),
        ("hf://someone/cards", "hub"),
        ("someone/cards", "hub"),
        ("./someone/cards", "folder"),
        ("/workspace/datasets/mine", "folder"),
        ("datasets/mine/2024", "folder"),
    ],
)
def test_classify_source(source, kind):
    assert classify_source(source) == kind


@pytest.mark.parametrize(
    ("source", "hint"),
    [
        ("file:///home/me/data", "plain path"),
        ("ftp://example.com/d.zip", "ftp:// is not supported"),
        ("s3://bucket/d.zip", "s3:// is not supported"),
        ("s3://AKIA:secret@bucket/d.zip?sig=x", "s3:// is not supported"),
        ("hf://not-an-id", "hf://owner/name"),
        ("https:///no-host.zip", "needs a host"),
    ],
)
def test_unreadable_sources_are_refused_naming_the_key(source, hint):
    with pytest.raises(DatasetError, match="train.dataset.source") as caught:
        classify_source(source)
    assert hint in str(caught.value)
    assert "secret" not in str(caught.value) and "sig=" not in str(caught.value)


def test_the_contract_module_loads_without_torch_or_pillow():
    probe = "import sys, contract.dataset; print(sorted({'torch', 'PIL', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
