"""The one place the trainer image's version lives: pyproject, the image tag and the stacks' defaults read it."""

__version__ = "0.1.0"
