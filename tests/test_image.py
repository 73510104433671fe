"""The trainer image: build-context hash, Dockerfile rules, build/push through the Docker SDK (faked engine),
and the Pulumi component (in a subprocess: Pulumi's mocks are process-global)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from infra import image

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tree(tmp_path) -> Path:
    """A miniature checkout: the real Dockerfile and .dockerignore, a few sources, and things that must not count."""
    files = {
        "container/Dockerfile": (ROOT / "container/Dockerfile").read_text(),
        "container/.dockerignore": (ROOT / "container/.dockerignore").read_text(),
        "pyproject.toml": "[project]\nname = 'x'\n",
        "README.md": "# docs\n",
        "training/__init__.py": "",
        "training/loop.py": "STEPS = 1\n",
        "training/__pycache__/loop.cpython-312.pyc": "bytecode",
        "infra/__init__.py": "",
        "infra/config.py": "STACK = 1\n",
        "infra/runpod_backend/__init__.py": "",
        "contract/spec.py": "SPEC = 1\n",
        "cloudapi/runpod_rest.py": "API = 1\n",
        "tests/test_x.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_context_is_what_the_image_is_built_from(tree):
    assert image.context_files(tree) == [
        "cloudapi/runpod_rest.py",
        "container/Dockerfile",
        "contract/spec.py",
        "pyproject.toml",
        "training/__init__.py",
        "training/loop.py",
    ]


@pytest.mark.parametrize(
    ("edited", "changes"),
    [
        ("training/loop.py", True),
        ("container/Dockerfile", True),
        ("pyproject.toml", True),
        ("cloudapi/runpod_rest.py", True),
        ("contract/spec.py", True),
        ("infra/runpod_backend/__init__.py", False),
        ("training/__pycache__/loop.cpython-312.pyc", False),
        ("README.md", False),
        ("infra/config.py", False),
        ("tests/test_x.py", False),
    ],
)
def test_tree_hash_follows_the_image_inputs_only(tree, edited, changes):
    before = image.tree_hash(tree)
    with open(tree / edited, "a") as handle:
        handle.write("# edit\n")
    assert (image.tree_hash(tree) != before) is changes


def test_content_hash_is_a_plain_function_of_paths_and_bytes(tree):
    files = ["training/loop.py", "training/__init__.py"]
    assert image.content_hash(tree, files) == image.content_hash(tree, list(reversed(files)))
    assert image.content_hash(tree, [*files, "training/__pycache__/loop.cpython-312.pyc"]) == image.content_hash(tree, files)
    (tree / "training/new.py").write_text("")
    assert image.content_hash(tree, [*files, "training/new.py"]) != image.content_hash(tree, files)  # a new empty file counts


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "container/Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def test_dockerfile_is_pinned_labelled_and_runs_the_trainer():
    instructions = dockerfile_instructions()
    bases = [argument for keyword, argument in instructions if keyword == "FROM"]
    assert len(bases) == 1
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?", bases[0])
    assert match, f"FROM must pin a CUDA runtime tag (no latest, no ARG): {bases[0]}"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(r for r in pyproject["project"]["optional-dependencies"]["train"] if r.startswith("torch=="))
    assert torch_pin == f"torch=={match.group(1)}", "the base image's torch must be the pinned one"

    labels = " ".join(argument for keyword, argument in instructions if keyword == "LABEL")
    for label in ("version", "revision", "source"):
        assert f"org.opencontainers.image.{label}=" in labels
    args = {argument.split("=")[0] for keyword, argument in instructions if keyword == "ARG"}
    assert {"VERSION", "REVISION"} <= args
    assert ("ENTRYPOINT", '["python", "-m", "training"]') in instructions
    assert any(keyword == "ENV" and "HF_HOME=/workspace/hf" in argument for keyword, argument in instructions)
    installs = " ".join(argument for keyword, argument in instructions if keyword == "RUN")
    assert "ca-certificates" in installs and "--no-deps ." in installs


def test_every_copy_source_is_in_the_build_context():
    context = image.context_files(ROOT)
    for keyword, argument in dockerfile_instructions():
        if keyword == "COPY":
            *sources, _ = argument.split()
            for source in sources:
                assert any(path == source or path.startswith(source.rstrip("/") + "/") for path in context), source


class FakeApi:
    def __init__(self):
        self.build_kwargs = None
        self.context_names: list[str] = []

    def build(self, **kwargs):
        self.build_kwargs = kwargs
        self.context_names = tarfile.open(fileobj=kwargs["fileobj"]).getnames()
        return iter([{"stream": "Step 1/9 : FROM pytorch/pytorch\n"}, {"stream": "Successfully built abc\n"}])

    def push(self, repository, tag, stream, decode):
        return iter([{"status": "Pushed"}, {"aux": {"Tag": tag, "Digest": "sha256:" + "ab" * 32, "Size": 1}}])


class FakeClient:
    def __init__(self):
        self.api = FakeApi()


def test_build_and_push_returns_the_digest_reference(tree):
    client, logged = FakeClient(), []
    reference = image.build_and_push("1.2.3", "registry.example/me/trainer", root=tree, client=client, log=logged.append)
    assert reference == "registry.example/me/trainer:1.2.3@sha256:" + "ab" * 32
    kwargs = client.api.build_kwargs
    assert kwargs["tag"] == "registry.example/me/trainer:1.2.3" and kwargs["dockerfile"] == "container/Dockerfile"
    assert kwargs["buildargs"]["VERSION"] == "1.2.3" and kwargs["buildargs"]["REVISION"] == "unknown"  # not a git repo
    assert "training/loop.py" in client.api.context_names and "README.md" not in client.api.context_names
    assert "Successfully built abc" in logged


def test_build_errors_surface(tree):
    client = FakeClient()
    client.api.build = lambda **kwargs: iter([{"error": "COPY failed: no such file\n"}])
    with pytest.raises(image.ImageError, match="COPY failed"):
        image.build_and_push("1.2.3", "r/t", root=tree, client=client, log=lambda line: None)


def test_cli_says_clearly_when_no_docker_engine_is_reachable(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    assert image.main(["--no-push"]) == 1
    assert "no Docker engine is reachable" in capsys.readouterr().err


PULUMI_PROGRAM = """
import json, sys
import pulumi
from infra import image_component

created = []

class Mocks(pulumi.runtime.Mocks):
    def new_resource(self, args):
        created.append({"type": args.typ, "name": args.name, "inputs": args.inputs})
        outputs = dict(args.inputs)
        if args.typ == "command:local:Command":
            outputs["stdout"] = "building...\\nr/t:1.2.3@sha256:" + "cd" * 32
        return [args.name + "-id", outputs]

    def call(self, args):
        return {}

pulumi.runtime.set_mocks(Mocks(), preview=False)

@pulumi.runtime.test
def run():
    trainer = image_component.TrainerImage("trainer", image_component.TrainerImageArgs(repository="r/t", version="1.2.3"))
    def report(values):
        print(json.dumps({"image_ref": values[0], "content_hash": values[1], "created": created}))
    return pulumi.Output.all(trainer.image_ref, trainer.content_hash).apply(report)

run()
"""


def test_trainer_image_component_builds_on_content_change():
    result = subprocess.run(
        [sys.executable, "-c", PULUMI_PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["image_ref"] == "r/t:1.2.3@sha256:" + "cd" * 32
    assert report["content_hash"] == image.tree_hash(ROOT)
    command = next(item for item in report["created"] if item["type"] == "command:local:Command")
    assert command["inputs"]["triggers"] == [image.tree_hash(ROOT), "r/t", "1.2.3"]
    assert "--print-digest-only" in command["inputs"]["create"] and "--version 1.2.3" in command["inputs"]["create"]
    assert any(item["type"] == "lorastack:image:TrainerImage" for item in report["created"])
