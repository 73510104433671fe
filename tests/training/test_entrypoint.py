"""`python -m training`: configuration errors, a finished run, and a whole run from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from contract.spec import ENV_LIMITS, ENV_RUN_ID, ENV_SPEC, ENV_WORKSPACE
from contract.workspace import RunPaths, read_json
from training.__main__ import main

from .helpers import make_spec

LIMITS = json.dumps({"maxHours": 1, "maxCostUsd": 5})


def test_bad_spec_from_the_environment_prints_one_line_per_problem_and_exits_2(tmp_path):
    spec = {"family": "sd15", "baseModel": "x", "dataset": {"source": "d"}, "learningRate": 5, "stepz": 3}
    environ = {
        **os.environ,
        ENV_SPEC: json.dumps(spec),
        ENV_LIMITS: json.dumps({"maxHours": -1, "maxCostUsd": 5}),
        ENV_WORKSPACE: str(tmp_path),
    }
    environ.pop(ENV_RUN_ID, None)
    repository = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "training"], cwd=repository, env=environ, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "lorastack: the training configuration is invalid:"
    assert any("$LORASTACK_SPEC: learningRate = 5: " in line for line in lines)
    assert any("$LORASTACK_SPEC: stepz: unknown key" in line for line in lines)
    assert any("$LORASTACK_LIMITS: maxHours = -1: " in line for line in lines)
    assert any("$LORASTACK_RUN_ID is not set" in line for line in lines)
    assert not list(tmp_path.iterdir())  # nothing was written


def test_missing_spec_is_a_clear_error(capsys):
    assert main({ENV_LIMITS: LIMITS, ENV_RUN_ID: "r"}) == 2
    assert "no training spec: set LORASTACK_SPEC" in capsys.readouterr().err


def test_finished_run_does_not_train_again(tmp_path, capsys):
    paths = RunPaths(tmp_path, "run-1")
    paths.done.parent.mkdir(parents=True)
    paths.done.write_text("{}")
    spec = {"family": "sd15", "baseModel": "x", "dataset": {"source": "d"}}
    environ = {ENV_SPEC: json.dumps(spec), ENV_LIMITS: LIMITS, ENV_RUN_ID: "run-1", ENV_WORKSPACE: str(tmp_path)}
    assert main(environ) == 0
    assert "already finished" in capsys.readouterr().out
    assert not paths.checkpoints.exists()


def test_whole_run_from_the_environment_trains_exports_and_marks_done(tiny_model, toy_images, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-before"))  # main points HF_HOME at the volume
    spec = make_spec("flux", tiny_model("flux"), toy_images, steps=3, checkpointEvery=2)
    environ = {ENV_SPEC: spec.to_env_json(), ENV_LIMITS: LIMITS, ENV_RUN_ID: "run-1", ENV_WORKSPACE: str(tmp_path)}
    assert main(environ) == 0
    paths = RunPaths(tmp_path, "run-1")
    assert os.environ["HF_HOME"] == str(paths.hf_home)
    assert paths.done.exists()
    assert (paths.lora / "pytorch_lora_weights.safetensors").is_file()
    status = read_json(paths.status)
    assert status["state"] == "succeeded" and status["step"] == 3
    assert Path(status["outputs"]["diffusers"]).is_file()
    assert main(environ) == 0  # the container came back: nothing to do


def test_local_training_command_trains_and_exports(tiny_model, toy_images, tmp_path, capsys):
    from training import local

    argv = ["--data", str(toy_images), "--family", "sd15", "--model", str(tiny_model("sd15")), "--steps", "2",
            "--resolution", "256", "--rank", "4", "--out", str(tmp_path)]  # fmt: skip
    assert local.main(argv) == 0
    out = capsys.readouterr().out
    assert "step 2/2" in out
    diffusers_file = Path(out.split("diffusers: ")[1].split()[0])
    assert diffusers_file.is_file() and diffusers_file.is_relative_to(tmp_path)


def test_time_limit_stops_with_a_checkpoint_and_exit_75(tiny_model, toy_images, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-before"))
    spec = make_spec("flux", tiny_model("flux"), toy_images, steps=5, checkpointEvery=5)  # none due at step 1
    limits = json.dumps({"maxHours": 1e-9, "maxCostUsd": 5})  # spent by the first step
    environ = {ENV_SPEC: spec.to_env_json(), ENV_LIMITS: limits, ENV_RUN_ID: "run-1", ENV_WORKSPACE: str(tmp_path)}
    assert main(environ) == 75
    paths = RunPaths(tmp_path, "run-1")
    status = read_json(paths.status)
    assert status["state"] == "limit" and "time limit" in status["message"]
    assert (paths.checkpoints / "step-1" / "trainer.json").is_file()
    assert not paths.done.exists()
