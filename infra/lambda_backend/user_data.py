"""The cloud-init user data a lorastack instance boots with: our pinned trainer image, started by Docker.

Lambda's images ship Docker and the NVIDIA container toolkit. The user data writes the container's environment
to a root-only env file and starts the trainer with the filesystem mounted at the workspace:

    docker run --detach --restart on-failure --gpus all --env-file FILE -v <filesystem mount>:/workspace IMAGE

`--restart on-failure` restarts a crashed trainer (it resumes from its last checkpoint and gives up after repeated
starts without progress); a trainer that ends terminates its own instance first (cloudapi/hosts.py LambdaHost), so
a clean exit is never restarted. The env holds the Lambda API key the trainer needs to terminate itself (and
HF_TOKEN / WANDB_API_KEY when set): the user data is a secret input, never plain in the state.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

import yaml

from contract.spec import WORKSPACE_MOUNT

ENV_FILE = "/etc/lorastack/trainer.env"
CONTAINER_NAME = "lorastack-trainer"
FILESYSTEM_ROOT = "/lambda/nfs"  # where Lambda mounts a filesystem by default: /lambda/nfs/<name>
LOCAL_WORKSPACE = "/home/ubuntu/lorastack-workspace"  # without a filesystem: the instance disk, gone with it
MAX_BYTES = 1024 * 1024  # "cannot exceed 1MB in size"


def filesystem_mount(filesystem_name: str | None) -> str:
    return f"{FILESYSTEM_ROOT}/{filesystem_name}" if filesystem_name else LOCAL_WORKSPACE


def render(image: str, env: Mapping[str, str], filesystem_name: str | None) -> str:
    """The `#cloud-config` document; ValueError when a value cannot go into Docker's env file or it is too big."""
    for name, value in env.items():
        if "\n" in value or "\r" in value:
            raise ValueError(f"env {name}: a value with a line break cannot go into Docker's --env-file")
    mount = filesystem_mount(filesystem_name)
    command = ["docker", "run", "--detach", "--name", CONTAINER_NAME, "--restart", "on-failure", "--gpus", "all",
               "--env-file", ENV_FILE, "-v", f"{mount}:{WORKSPACE_MOUNT}", image]
    document = {
        "write_files": [{
            "path": ENV_FILE,
            "permissions": "0600",
            "owner": "root:root",
            "content": "".join(f"{name}={value}\n" for name, value in env.items()),
        }],
        "runcmd": [["mkdir", "-p", mount], ["sh", "-c", shlex.join(command)]],
    }
    text = "#cloud-config\n" + yaml.safe_dump(document, sort_keys=False, width=1 << 20)
    if len(text.encode()) > MAX_BYTES:
        raise ValueError(f"the user data is {len(text.encode())} bytes; Lambda takes at most {MAX_BYTES}")
    return text
