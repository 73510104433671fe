"""A dataset behind a URL with credentials: the trainer downloads with them (they come as a secret variable)
and writes them nowhere: not into status.json, checkpoints, the LoRA metadata or the model card."""

from __future__ import annotations

import base64
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from contract.spec import ENV_DATASET_SOURCE, ENV_LIMITS, ENV_RUN_ID, ENV_SPEC, ENV_WORKSPACE
from contract.workspace import RunPaths, read_json
from training.__main__ import main

from .helpers import make_spec

PASSWORD = "s3cr3t-pass-9f8e7d"
SIGNATURE = "sig-0a1b2c3d4e5f"


@pytest.fixture
def private_archive(toy_images):
    """An HTTP server that hands out the zipped images only to alice with her password."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(toy_images.iterdir()):
            archive.write(path, path.name)
    payload = buffer.getvalue()
    expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            allowed = self.headers.get("Authorization") == expected and self.path.endswith(f"?sig={SIGNATURE}")
            self.send_response(200 if allowed else 403)
            self.send_header("Content-Length", str(len(payload) if allowed else 0))
            self.end_headers()
            if allowed:
                self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}/sets/style.zip"
    server.shutdown()


def test_credentials_in_the_dataset_url_are_used_and_written_nowhere(tiny_model, private_archive, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-before"))
    spec = make_spec("sd15", tiny_model("sd15"), Path("unused"), steps=2, checkpointEvery=1)
    spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"source": f"http://{private_archive}"})})
    environ = {ENV_SPEC: spec.to_env_json(), ENV_LIMITS: json.dumps({"maxHours": 1, "maxCostUsd": 5}),
               ENV_RUN_ID: "run-1", ENV_WORKSPACE: str(tmp_path),
               ENV_DATASET_SOURCE: f"http://alice:{PASSWORD}@{private_archive}?sig={SIGNATURE}"}
    assert main(environ) == 0  # the download needed the password and the signature
    paths = RunPaths(tmp_path, "run-1")
    assert read_json(paths.status)["state"] == "succeeded"
    written = [path for path in paths.root.rglob("*") if path.is_file()]
    assert any(path.suffix == ".safetensors" for path in written) and any(path.name == "README.md" for path in written)
    for path in written:
        content = path.read_bytes()
        assert PASSWORD.encode() not in content and SIGNATURE.encode() not in content, path
