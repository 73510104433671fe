"""The `lorastack:vast` section: each mistake is named with the file, the key and what is allowed, before anything
is rented; the cost row says where its price comes from."""

from __future__ import annotations

import copy

import pytest
import yaml

from infra.stack_files import STACKS_DIR, StackError, parse_stack

STACK = "sdxl-vast-4090"


def config(**vast) -> dict:
    raw = yaml.safe_load((STACKS_DIR / f"Pulumi.{STACK}.yaml").read_text())["config"]
    raw = copy.deepcopy(raw)
    raw["lorastack:vast"].update(vast)
    return raw


@pytest.mark.parametrize(("change", "expected"), [
    ({"gpuName": "RTX_4090"}, "lorastack:vast.gpuName"),
    ({"maxUsdPerHour": 0.1}, "maxUsdPerHour 0.1 is below the lowest recorded rate"),
    ({"minReliability": 1.5}, "lorastack:vast.minReliability"),
    ({"bucket": {"url": "https://bucket/prefix"}}, "s3://<bucket>"),
    ({"bucket": {"url": "s3://b-1/x", "endpoint": "r2.example.com"}}, "an endpoint is an http(s) URL"),
])
def test_a_bad_vast_setting_is_named(change, expected):
    with pytest.raises(StackError) as error:
        parse_stack(config(**change), f"stacks/Pulumi.{STACK}.yaml")
    assert any(expected in line and line.startswith(f"stacks/Pulumi.{STACK}.yaml") for line in error.value.problems), \
        error.value.problems


def test_wait_is_refused_with_what_to_do_instead():
    raw = config()
    raw["lorastack:wait"] = True
    with pytest.raises(StackError, match="make fetch"):
        parse_stack(raw, STACK)


def test_the_estimate_counts_at_the_ceiling_and_live_offers_replace_it():
    stack = parse_stack(config(), STACK)
    usd, source = stack.usd_per_hour()
    assert usd == 0.70 and "maxUsdPerHour" in source and "copied 2026-11-30" in source
    offers = [{"gpu_name": "RTX 4090", "num_gpus": 1, "reliability": 0.99, "disk_space": 200, "verification": "verified",
               "dph_total": price} for price in (0.62, 0.41)]
    offers.append({**offers[1], "dph_total": 0.30, "reliability": 0.9})  # below the reliability floor
    assert stack.usd_per_hour(offers)[0] == 0.41
    assert stack.run_limits().usd_per_hour == 0.70  # the money limit never counts short
