"""Folder: the stack's checkpoints folder on the engine's machine, bind-mounted at /workspace in every container.

It outlives containers as a network volume outlives pods: a new container resumes from its newest checkpoint.
`keepOnDestroy: true` (the default) makes it a retained resource: `pulumi destroy` forgets it and never deletes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, DiffResult, ReadResult, ResourceProvider


class FolderProvider(ResourceProvider):
    """Inputs: path (absolute). The id is the path."""

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        path = news.get("path")
        failures = [] if isinstance(path, str) and os.path.isabs(path) else [
            CheckFailure("path", f"must be an absolute path (got {path!r})")]
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        moved = olds.get("path") != news.get("path")
        return DiffResult(changes=moved, replaces=["path"] if moved else [])

    def create(self, props: dict[str, Any]) -> CreateResult:
        os.makedirs(props["path"], exist_ok=True)  # an existing folder (an earlier stack's) is adopted with its runs
        return CreateResult(props["path"], {"path": props["path"]})

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        return ReadResult(id_ if os.path.isdir(id_) else "", {"path": id_})

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        try:
            shutil.rmtree(id_)
        except FileNotFoundError:
            pass
        except PermissionError as error:
            raise RuntimeError(
                f"cannot delete {id_}: {error} (files written by a container as another user; remove the folder "
                "with sudo, or set local.keepOnDestroy: true)"
            ) from None


@dataclass
class FolderArgs:
    path: pulumi.Input[str]


class Folder(pulumi.dynamic.Resource, module="local", name="Folder"):
    path: pulumi.Output[str]

    def __init__(self, resource_name: str, args: FolderArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__(FolderProvider(), resource_name, {"path": args.path}, opts)
