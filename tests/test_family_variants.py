"""A family's variants: base models whose native size or memory differ from the family's first one get their
own figures in the schema's default resolution, the memory fit and the cost estimate."""

from __future__ import annotations

import pytest

from contract import memory
from contract.families import FAMILIES, facts_for
from contract.spec import TrainSpec
from infra import pricing

VARIANTS = [(facts, variant) for facts in FAMILIES.values() for variant in facts.variants]


def spec(family: str, base_model: str, **extra) -> TrainSpec:
    return TrainSpec.model_validate(
        {"family": family, "baseModel": base_model, "dataset": {"source": "hf://user/data"}, "steps": 100, **extra}
    )


def test_families_have_variants_to_check():
    assert VARIANTS, "no family declares a variant: this module checks nothing"


@pytest.mark.parametrize(("facts", "variant"), VARIANTS, ids=lambda item: getattr(item, "name", ""))
def test_a_variant_base_model_gets_its_own_figures(facts, variant):
    for base_model in variant.base_models:
        for spelling in (base_model, base_model.upper(), f"/models/{base_model.split('/')[-1]}/"):
            found = facts_for(facts.name, spelling)
            assert found.native_resolution == variant.native_resolution and found.memory == variant.memory
        assert spec(facts.name, base_model).resolution == variant.native_resolution
    # the family's own base models keep the family's figures
    assert facts_for(facts.name, "someone/fine-tune").native_resolution == facts.native_resolution
    assert spec(facts.name, "someone/fine-tune").resolution == facts.native_resolution


@pytest.mark.parametrize(("facts", "variant"), VARIANTS, ids=lambda item: getattr(item, "name", ""))
def test_memory_and_time_follow_the_variant(facts, variant):
    base_model = variant.base_models[0]
    resolution = facts.native_resolution
    on_variant = spec(facts.name, base_model, resolution=resolution, cacheLatents=False)
    on_family = spec(facts.name, "someone/fine-tune", resolution=resolution, cacheLatents=False)
    assert memory.estimate(on_variant, False).weights_gib == pytest.approx(
        (variant.memory.denoiser_params_b + variant.memory.encoders_params_b) * 1e9 * 2 / 2**30
    )
    if variant.memory != facts.memory:  # SD 2.1 (768-v) has 2.1-base's architecture: the same memory at one size
        assert memory.estimate(on_variant, False) != memory.estimate(on_family, False)
    at_native = memory.estimate(spec(facts.name, base_model, cacheLatents=False), False)  # the variant's own size
    assert at_native.activations_gib == pytest.approx(
        variant.memory.activations_gib * variant.native_resolution**2 / variant.memory.reference_pixels
    )

    gpu = next(iter(variant.seconds_per_step))
    at_native = pricing.seconds_per_step(facts.name, gpu, variant.native_resolution, 1, base_model=base_model)
    assert at_native == pytest.approx(variant.seconds_per_step[gpu])
