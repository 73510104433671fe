"""`make fetch` of a Replicate stack: the newest training's weights, as Replicate returns them (a .tar from its
delivery host, served here by a local HTTP server), and a report of what there is to show."""

from __future__ import annotations

import functools
import http.server
import io
import tarfile
import threading

import pytest
import replicate

from emulator.replicate import DEFAULT_TOKEN, TRAINER, TRAINER_VERSION, FakeClock, ReplicateApi
from emulator.server import serve
from infra import ops
from infra import paths as project_paths
from infra.replicate_backend.catalog import REPLICATE_HARDWARE_USD_PER_SECOND
from infra.stack_files import load_stack

STACK = "flux-replicate"
LORA = b"safetensors bytes of the trained LoRA"


@pytest.fixture
def delivery(tmp_path):
    """A local stand-in for replicate.delivery serving trained_model.tar (as the FLUX trainer lays it out)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as bundle:
        for name, data in (("output/flux_train_replicate/lora.safetensors", LORA), ("output/config.yaml", b"x: 1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    (tmp_path / "trained_model.tar").write_bytes(buffer.getvalue())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/trained_model.tar"
    server.shutdown()


@pytest.fixture
def emulator(monkeypatch, tmp_path):
    config = load_stack(STACK)
    api = ReplicateApi(account=config.replicate.owner, start_seconds=5.0, run_seconds=60.0)
    api.clock = FakeClock()
    with serve(api) as base_url:
        monkeypatch.setattr(project_paths, "OUTPUTS_DIR", tmp_path / "outputs")
        environ = {"REPLICATE_API_TOKEN": DEFAULT_TOKEN, "REPLICATE_BASE_URL": base_url}
        client = replicate.Client(api_token=DEFAULT_TOKEN, base_url=base_url)
        client.models.create(owner=config.replicate.owner, name=config.replicate.model, visibility="private",
                             hardware="gpu-h100")
        yield api, client, config, environ


def train(api, client, config) -> str:
    training = client.trainings.create(model=TRAINER, version=TRAINER_VERSION,
                                       destination=f"{config.replicate.owner}/{config.replicate.model}",
                                       input={"input_images": "https://example.com/data.zip", "steps": 100})
    api.clock.advance(100)
    api.settle()
    return training.id


def test_fetch_downloads_the_newest_trainings_weights_and_renders_a_report(emulator, delivery, tmp_path):
    api, client, config, environ = emulator
    train(api, client, config)
    newest = train(api, client, config)
    api.trainings[newest].output["weights"] = delivery
    out = io.StringIO()

    assert ops.run_command("fetch", STACK, config, out, environ) == 0, out.getvalue()

    folder = tmp_path / "outputs" / STACK
    assert (folder / "lora.safetensors").read_bytes() == LORA
    assert sorted(path.name for path in folder.iterdir()) == ["lora.safetensors", "report.html"]
    page = (folder / "report.html").read_text()
    cost = 60.0 * REPLICATE_HARDWARE_USD_PER_SECOND[config.replicate.training_hardware]
    assert newest in page and "replicate" in page and config.replicate.training_hardware in page
    assert f"{cost:.2f}" in page and "lora.safetensors" in page
    assert f"report: {folder / 'report.html'}" in out.getvalue()
    assert DEFAULT_TOKEN not in out.getvalue()


def test_fetch_says_what_the_newest_training_is_when_it_has_no_weights(emulator, capsys):
    api, client, config, environ = emulator
    training = client.trainings.create(model=TRAINER, version=TRAINER_VERSION,
                                       destination=f"{config.replicate.owner}/{config.replicate.model}",
                                       input={"input_images": "https://example.com/data.zip", "steps": 100})
    assert ops.run_command("fetch", STACK, config, io.StringIO(), environ) == 2
    assert f"https://replicate.com/p/{training.id}, is starting: no weights to fetch" in capsys.readouterr().err


def test_fetch_without_a_token_names_it(emulator, capsys):
    _, _, config, _ = emulator
    assert ops.run_command("fetch", STACK, config, io.StringIO(), {}) == 2
    assert "REPLICATE_API_TOKEN is not set" in capsys.readouterr().err
