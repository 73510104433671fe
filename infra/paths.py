"""Where things are in a checkout: the one repository root every module that reads project files starts from."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
STACKS_DIR = REPO_ROOT / "stacks"  # stacks/Pulumi.<stack>.yaml
# outputs/<stack>/: what `make fetch` and `wait: true` download. LORASTACK_OUTPUTS_DIR moves it (CI artifacts, tests):
# under `pulumi up` the follower runs in the program's own process, which only the environment reaches.
OUTPUTS_DIR = Path(os.environ.get("LORASTACK_OUTPUTS_DIR") or REPO_ROOT / "outputs")
