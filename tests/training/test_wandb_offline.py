"""W&B without a key: the run is written offline on the volume, and the log names the folders `wandb sync` uploads
(real wandb, offline: no network)."""

from __future__ import annotations

import glob
import shlex

import pytest

from contract.spec import TrainSpec
from contract.workspace import RunPaths
from training.tracking import start_wandb

wandb = pytest.importorskip("wandb")


def test_offline_run_is_where_the_log_says_and_sync_finds_it(tmp_path, monkeypatch, capsys):
    for variable in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    spec = TrainSpec.model_validate({"family": "sd15", "baseModel": "x", "dataset": {"source": "d"},
                                     "wandbProject": "loras"})
    paths = RunPaths(tmp_path / "workspace", "run-1")
    run = start_wandb(spec, paths, "run-1", environ={})
    run.log({"loss": 0.5}, step=1)
    run.finish()
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("W&B is offline"))
    pattern = shlex.split(line.split("`wandb sync ", 1)[1].rstrip("`"))[0]
    folders = glob.glob(pattern)
    assert len(folders) == 1, (pattern, list((paths.run / "wandb").rglob("*"))[:10])
    assert glob.glob(f"{folders[0]}/run-*.wandb")  # what `wandb sync <folder>` uploads
