"""The Pulumi program: stack config -> its backend's component (infra.backends) -> the stack outputs.

`infra/__main__.py` calls `build(pulumi.get_stack())` and exports what it returns. Tests run it as the Pulumi CLI
does, through emulator/language_host.py (docs/engine.md).
"""

from __future__ import annotations

import pulumi

from infra.config import NAMESPACE, StackConfig
from infra.credentials import SECRETS, secret
from infra.stack_files import StackError, load_from_pulumi


def build(stack: str) -> dict[str, pulumi.Output | object]:
    """Declare the stack's resources; returns the outputs to export."""
    try:
        config = load_from_pulumi(stack)
    except StackError as error:
        raise pulumi.RunError("\n".join(error.problems)) from None
    pulumi_config = pulumi.Config(NAMESPACE)
    secrets = {name: secret(name, pulumi_config) for name in SECRETS}

    # the backend's package is imported only by the stacks that use it; it asks for the image only if it runs ours
    return config.backend.build(stack, config, secrets, lambda: image_ref(stack, config))


def image_ref(stack: str, config: StackConfig) -> pulumi.Input[str]:
    """The pinned trainer image: the stack's release, or (image.build) the one built and pushed from this checkout."""
    if not config.image.build:
        return config.image.ref
    from infra.image_component import TrainerImage, TrainerImageArgs  # docker and pulumi-command: only when building

    image = TrainerImage(f"{stack}-image", TrainerImageArgs(repository=config.image.repository, version=config.image.version))
    return image.image_ref
