"""Where things are in a checkout: the one repository root every module that reads project files starts from."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
STACKS_DIR = REPO_ROOT / "stacks"  # stacks/Pulumi.<stack>.yaml
OUTPUTS_DIR = REPO_ROOT / "outputs"  # outputs/<stack>/: what `make fetch` and `wait: true` download
