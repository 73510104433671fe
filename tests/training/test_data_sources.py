"""Dataset sources, keyed by content: archive URLs over a real local HTTP server (unchanged, changed, broken off,
corrupt, gone), credentials kept out of messages and the volume, archive caps and damaged archives, the
sources the trainer refuses, and folders confined to the volume on a pod."""

from __future__ import annotations

import http.server
import io
import json
import os
import socket
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from contract.spec import ENV_MANAGED, ENV_SPEC, SpecError, spec_from_environment
from contract.workspace import RunPaths
from training.data import DatasetError, prepare_dataset, safe_extract

from .helpers import make_spec


class Server:
    """A folder served over HTTP on 127.0.0.1, recording (path, status) and able to break off a body."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.answers: list[tuple[str, int]] = []
        self.break_off_next = 0  # answers that send the full Content-Length, half the body, then hang up
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.folder), **kwargs)

            def do_GET(self):
                if server.break_off_next:
                    server.break_off_next -= 1
                    data = (server.folder / self.path.lstrip("/").split("?")[0]).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                super().do_GET()

            def log_request(self, code="-", size="-"):
                server.answers.append((self.path, int(code)))

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def publish(self, name: str, data: bytes) -> None:
        """Serve new bytes under `name`, dated later than anything served before (Last-Modified moves on)."""
        path = self.folder / name
        path.write_bytes(data)
        later = time.time() + 10 * (1 + len(self.answers))
        os.utime(path, (later, later))


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    served = Server(folder)
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


def zipped(folder: Path, captions: dict[str, str] | None = None) -> bytes:
    """The folder as a zip under toy/, with some captions replaced."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for file in sorted(folder.iterdir()):
            data = (captions or {}).get(file.name, None)
            bundle.writestr(f"toy/{file.name}", data if data is not None else file.read_bytes())
    return buffer.getvalue()


def url_spec(url: str, data: Path):
    return make_spec("sd15", Path("unused"), data, dataset={"source": url})


def volume_files(workspace: Path) -> list[Path]:
    return [path for path in workspace.rglob("*") if path.is_file()]


def test_an_unchanged_url_is_asked_again_but_not_downloaded_again(server, toy_images, workspace):
    server.publish("toy.zip", zipped(toy_images))
    spec = url_spec(f"{server.url}/toy.zip", toy_images)
    first = prepare_dataset(spec, RunPaths(workspace, "a"))
    second = prepare_dataset(spec, RunPaths(workspace, "b"))
    assert second.reused and second.data_hash == first.data_hash
    assert [status for _, status in server.answers] == [200, 304]  # the second answer carried no body


def test_new_bytes_behind_the_same_url_are_a_new_dataset(server, toy_images, workspace):
    server.publish("toy.zip", zipped(toy_images))
    spec = url_spec(f"{server.url}/toy.zip", toy_images)
    first = prepare_dataset(spec, RunPaths(workspace, "a"))
    server.publish("toy.zip", zipped(toy_images, {"image-000.txt": "a new caption"}))
    second = prepare_dataset(spec, RunPaths(workspace, "a"))
    assert not second.reused and second.data_hash != first.data_hash
    assert "a new caption" in [sample.caption for sample in second.samples]
    assert [status for _, status in server.answers] == [200, 200]


def test_a_download_that_breaks_off_is_not_reused_and_a_retry_succeeds(server, toy_images, workspace):
    server.publish("toy.zip", zipped(toy_images))
    server.break_off_next = 1
    spec = url_spec(f"{server.url}/toy.zip", toy_images)
    with pytest.raises(DatasetError, match=r"train.dataset.source .*toy.zip.*download failed"):
        prepare_dataset(spec, RunPaths(workspace, "a"))
    assert volume_files(workspace) == []  # no partial archive, no record of the URL

    dataset = prepare_dataset(spec, RunPaths(workspace, "a"))
    assert len(dataset.samples) == 6 and not dataset.reused
    assert [status for _, status in server.answers] == [200, 200]  # asked afresh, not conditionally


def test_a_corrupt_archive_is_not_kept_and_a_fixed_one_is_used(server, toy_images, workspace):
    server.publish("toy.zip", zipped(toy_images)[:-200])  # a complete answer, a damaged zip
    spec = url_spec(f"{server.url}/toy.zip", toy_images)
    with pytest.raises(DatasetError, match=r"toy.zip"):
        prepare_dataset(spec, RunPaths(workspace, "a"))
    assert volume_files(workspace) == []
    server.publish("toy.zip", zipped(toy_images))
    assert len(prepare_dataset(spec, RunPaths(workspace, "a")).samples) == 6


def test_when_the_url_is_gone_what_it_served_before_is_used_with_a_warning(server, toy_images, workspace, capsys):
    server.publish("toy.zip", zipped(toy_images))
    spec = url_spec(f"{server.url}/toy.zip", toy_images)
    first = prepare_dataset(spec, RunPaths(workspace, "a"))
    (server.folder / "toy.zip").unlink()  # e.g. a presigned URL expired before a resumed pod started
    again = prepare_dataset(spec, RunPaths(workspace, "b"))
    assert again.reused and again.data_hash == first.data_hash
    assert "HTTP 404; using what" in capsys.readouterr().err


def test_credentials_in_the_url_reach_no_message_and_nothing_on_the_volume(server, toy_images, workspace):
    server.publish("toy.zip", zipped(toy_images))
    secret_url = f"{server.url}/toy.zip?X-Amz-Signature=t0ken".replace("http://", "http://user:s3cret@")
    prepare_dataset(url_spec(secret_url, toy_images), RunPaths(workspace, "a"))
    for path in volume_files(workspace):
        data = path.read_bytes()
        assert b"s3cret" not in data and b"t0ken" not in data, path

    with socket.socket() as probe:  # a port nothing listens on: requests' message quotes the path and query
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    for failing in (
        secret_url.replace("toy.zip", "missing.zip"),
        f"http://user:s3cret@127.0.0.1:{closed_port}/toy.zip?X-Amz-Signature=t0ken",
    ):
        with pytest.raises(DatasetError, match="download failed") as caught:
            prepare_dataset(url_spec(failing, toy_images), RunPaths(workspace, "a"))
        message = str(caught.value)
        assert "s3cret" not in message and "t0ken" not in message and "127.0.0.1" in message
        error = caught.value  # no chained exception whose traceback would quote the URL
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


# ---------------------------------------------------------------------------------------------- archives


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return path


def test_an_archive_with_too_many_files_is_refused(tmp_path):
    archive = make_zip(tmp_path / "many.zip", {f"{index}.txt": b"x" for index in range(5)})
    with pytest.raises(DatasetError, match=r"many.zip: the archive holds 5 files; at most 4 are accepted"):
        safe_extract(archive, tmp_path, max_files=4)


def test_an_archive_that_unpacks_too_large_is_refused_before_writing(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(3 * 2**20)})  # 3 MiB of zeros: ~3 KB zipped
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError, match=r"bomb.zip: the archive unpacks to 3.0 MiB; at most 1.0 MiB are accepted"):
        safe_extract(archive, out, max_bytes=2**20)
    assert list(out.iterdir()) == []


def test_a_tar_past_the_caps_is_refused(tmp_path):
    archive = tmp_path / "many.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        for index in range(3):
            member = tarfile.TarInfo(f"{index}.txt")
            member.size = 100
            bundle.addfile(member, io.BytesIO(bytes(100)))
    with pytest.raises(DatasetError, match="holds 3 files; at most 2"):
        safe_extract(archive, tmp_path, max_files=2)
    with pytest.raises(DatasetError, match="unpacks to 300 bytes; at most 200 bytes"):
        safe_extract(archive, tmp_path, max_bytes=200)


def test_a_tar_member_name_that_is_not_utf8_is_named(tmp_path):
    archive = tmp_path / "names.tar"
    name = b"toy/caf\xe9.txt".decode("utf-8", "surrogateescape")
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as bundle:
        member = tarfile.TarInfo(name)
        member.size = 2
        bundle.addfile(member, io.BytesIO(b"hi"))
    with pytest.raises(DatasetError, match=r"names.tar: member name 'toy/caf\ufffd.txt' is not valid UTF-8"):
        safe_extract(archive, tmp_path)


def test_a_truncated_tar_gz_is_a_damaged_archive(tmp_path):
    archive = tmp_path / "cut.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        member = tarfile.TarInfo("noise.bin")
        member.size = 200_000
        bundle.addfile(member, io.BytesIO(os.urandom(200_000)))
    archive.write_bytes(archive.read_bytes()[:50_000])
    with pytest.raises(DatasetError, match="cut.tar.gz: a damaged archive"):
        safe_extract(archive, tmp_path)


# ----------------------------------------------------------------------------------------- source kinds


@pytest.mark.parametrize("source", ["file:///data/set", "ftp://example.com/d.zip", "s3://bucket/d.zip"])
def test_sources_the_trainer_cannot_read_are_refused_naming_the_key(source, tmp_path):
    # the schema refuses them when the pod reads its spec, as `make check` did, before any download
    raw = json.loads(make_spec("sd15", Path("unused"), tmp_path).to_env_json()) | {"dataset": {"source": source}}
    with pytest.raises(SpecError, match=rf"^\$LORASTACK_SPEC: dataset.source = '{source}': "):
        spec_from_environment({ENV_SPEC: json.dumps(raw)})


def test_on_a_pod_a_folder_must_be_on_the_volume(toy_images, workspace, monkeypatch):
    monkeypatch.setenv(ENV_MANAGED, "1")
    on_volume = workspace / "datasets" / "mine"
    on_volume.mkdir(parents=True)
    for file in toy_images.iterdir():
        (on_volume / file.name).write_bytes(file.read_bytes())
    paths = RunPaths(workspace, "a")
    relative = prepare_dataset(make_spec("sd15", Path("unused"), Path("datasets/mine")), paths)
    assert len(relative.samples) == 6  # relative to the volume, wherever the trainer was started

    for outside in (toy_images, Path("../elsewhere"), workspace / "datasets" / ".." / ".."):
        with pytest.raises(DatasetError, match=r"train.dataset.source .*on a pod a folder must be on the volume"):
            prepare_dataset(make_spec("sd15", Path("unused"), outside), paths)
