"""The policy pack Pulumi runs: `pulumi preview --policy-pack policy/` (and CI's pulumi/actions with policyPacks)."""

import sys
from pathlib import Path

from pulumi_policy import PolicyPack

# Pulumi starts this file from the pack's folder; the policies live beside it (tests import them as policy.*).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lorastack_policies import POLICIES

PolicyPack(
    name="lorastack",
    description="Guardrails for LoRA training runs: limits, pinned images, private models, kept volumes, secrets.",
    policies=POLICIES,
)
