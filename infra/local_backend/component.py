"""LocalTraining: one stack's training run on the user's own GPU: the checkpoints folder and the container.

The container gets the environment a RunPod pod gets (infra.runpod_backend.component.pod_env: the spec and
limits as JSON, the run id, /workspace as workspace with the Hugging Face cache on it, the reaper's mark), with
the folder bind-mounted at /workspace, so the same image trains the same way and resumes from the same layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pulumi

from contract.naming import pod_name, run_id
from contract.workspace import RunPaths
from infra.config import StackConfig
from infra.local_backend import engine
from infra.local_backend.container import Container, ContainerArgs
from infra.local_backend.folder import Folder, FolderArgs
from infra.runpod_backend.component import pod_env


@dataclass
class LocalTrainingArgs:
    stack: str
    config: StackConfig
    image_ref: pulumi.Input[str]
    secrets: Mapping[str, pulumi.Output | None] = field(default_factory=dict)  # hfToken, wandbApiKey when set


def engine_user() -> str:
    """uid:gid of whoever runs `pulumi up`, so the folder's files are theirs (no such ids on Windows)."""
    return f"{os.getuid()}:{os.getgid()}" if hasattr(os, "getuid") else ""


class LocalTraining(pulumi.ComponentResource):
    folder: Folder
    container: Container
    exports: dict[str, object]

    def __init__(self, name: str, args: LocalTrainingArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:local:Training", name, None, opts)
        config, stack = args.config, args.stack
        local = config.local
        if local is None:
            raise ValueError(f"stack {stack}: LocalTraining needs the lorastack:local section")
        if not pulumi.runtime.is_dry_run():
            # one line before anything is planned, rather than a provider's traceback; preview needs no engine
            try:
                engine.connect(os.environ, timeout=10).close()
            except engine.NoEngine as error:
                raise pulumi.RunError(str(error)) from None
        path = str(local.folder_path(stack))
        kept = local.keep_on_destroy
        self.folder = Folder(f"{name}-folder", FolderArgs(path=path),
                             pulumi.ResourceOptions(parent=self, retain_on_delete=kept))
        self.container = Container(
            f"{name}-container",
            ContainerArgs(
                name=pod_name(stack), stack=stack, image=args.image_ref, env=pod_env(stack, config, args.secrets),
                folder=self.folder.id, gpus=local.gpu_count, shm_size_gb=local.shm_size_gb, user=engine_user(),
            ),
            pulumi.ResourceOptions(parent=self),
        )
        run = run_id(stack, config.train)
        self.exports = {
            "provider": "local",
            "folder": path,
            "containerId": self.container.id,
            "gpu": f"{local.gpu_type} (gpus: {local.gpu_count})",
            **config.cost_estimate().as_outputs(),
            "runId": run,
            "loraDir": str(RunPaths(Path(path), run).lora),
            "logsCommand": f"make logs STACK={stack}",
        }
        self.register_outputs(self.exports)
