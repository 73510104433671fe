"""The Pulumi program: stack config -> the backend's component -> the stack outputs.

`infra/__main__.py` calls `build(pulumi.get_stack())` and exports what it returns; tests call it under
`pulumi.runtime.set_mocks`.
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

    if config.provider == "runpod":
        from infra.runpod_backend.component import RunpodTraining, RunpodTrainingArgs

        args = RunpodTrainingArgs(stack=stack, config=config, image_ref=image_ref(stack, config), secrets=secrets)
        return dict(RunpodTraining(stack, args).exports)

    # another backend's package: imported only by the stacks that use it
    from infra.replicate_backend.component import ReplicateTraining, ReplicateTrainingArgs

    return dict(ReplicateTraining(stack, ReplicateTrainingArgs(stack=stack, config=config, secrets=secrets)).exports)


def image_ref(stack: str, config: StackConfig) -> pulumi.Input[str]:
    """The pinned trainer image: the stack's release, or (image.build) the one built and pushed from this checkout."""
    if not config.image.build:
        return config.image.ref
    from infra.image import TrainerImage, TrainerImageArgs  # docker and pulumi-command: only when building

    image = TrainerImage(f"{stack}-image", TrainerImageArgs(repository=config.image.repository, version=config.image.version))
    return image.image_ref
