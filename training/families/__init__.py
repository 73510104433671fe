"""The registry of model families: `family_for(name)` -> the family's `ModelFamily` (training/families/base.py).

Each family is the module `training.families.<name>` for every name contract/families.py registers,
imported on first use (tiny.py and the family modules import each other's helpers, never at import time).

Adding a family: its `FamilyFacts` in contract/families.py (the schema accepts the name from then on), the
module here with `FAMILY = <ModelFamily subclass>()` including its tiny model, and for the full-size
benchmark its published configs in bench/configs/<name>.json. tests/training/test_families.py trains every
registered family's tiny model one step through this interface.
"""

from __future__ import annotations

import importlib

from contract.families import facts_for
from training.families.base import ModelFamily, StepInputs

__all__ = ["ModelFamily", "StepInputs", "family_for"]


def family_for(name: str) -> ModelFamily:
    """The family called `name` (a stack's `train.family`); ValueError naming the known ones otherwise."""
    facts = facts_for(name)
    family = importlib.import_module(f"{__name__}.{facts.name}").FAMILY
    if family.facts is not facts:
        raise TypeError(f"training/families/{name}.py implements {family.name}, not {name}")
    return family
