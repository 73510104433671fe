"""TrainerImage: the Pulumi side of `make image`, for stacks with `image.build: true`.

A pulumi-command `local.Command` runs the image CLI (`python -m infra.image`), and its trigger is `content_hash()`
of the build context, so a trainer change builds and rolls the pod, an unchanged tree nothing.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass

import pulumi

from infra.image import ImageError, tree_hash
from infra.paths import REPO_ROOT


@dataclass
class TrainerImageArgs:
    repository: pulumi.Input[str]
    version: pulumi.Input[str]


class TrainerImage(pulumi.ComponentResource):
    """Builds and pushes the trainer image when its build context changes; `image_ref` is repo:version@sha256:..."""

    image_ref: pulumi.Output[str]

    def __init__(self, name: str, args: TrainerImageArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:image:TrainerImage", name, None, opts)
        from pulumi_command import local

        context_hash = tree_hash(REPO_ROOT)
        command = pulumi.Output.all(args.repository, args.version).apply(
            lambda values: shlex.join(
                [sys.executable, "-m", "infra.image", "--print-digest-only", "--repository", values[0], "--version", values[1]]
            )
        )
        build = local.Command(
            f"{name}-build",
            create=command,
            dir=str(REPO_ROOT),
            triggers=[context_hash, args.repository, args.version],
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.content_hash = pulumi.Output.from_input(context_hash)
        self.image_ref = build.stdout.apply(_digest_reference)
        self.register_outputs({"image_ref": self.image_ref, "content_hash": self.content_hash})


def _digest_reference(stdout: str) -> str:
    lines = [line.strip() for line in (stdout or "").splitlines() if line.strip()]
    if not lines or "@sha256:" not in lines[-1]:
        raise ImageError(f"the image build printed no digest reference (stdout: {stdout[-300:]!r})")
    return lines[-1]
