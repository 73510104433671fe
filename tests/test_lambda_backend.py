"""The Lambda Cloud backend's hooks outside Pulumi (reaper rules, `make status`, live prices, the stack schema)
against emulator/lambda_cloud.py, and its policy-pack policies on the inputs its component declares."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cloudapi.lambda_rest import LambdaClient
from emulator.lambda_cloud import LambdaCloudApi
from emulator.server import serve
from infra.backends import OpsError
from infra.config import StackConfig
from infra.lambda_backend import reap
from infra.lambda_backend.backend import BACKEND
from infra.lambda_backend.user_data import render
from infra.stack_files import load_stack
from tests.test_policy import violations

KEY = "secret_lambda_backend_test_key"
STACK = "sdxl-lambda-h100"
INSTANCE_TYPE = "pulumi-python:dynamic/lambda:Instance"
FILESYSTEM_TYPE = "pulumi-python:dynamic/lambda:Filesystem"


@pytest.fixture
def api():
    emulator = LambdaCloudApi(api_key=KEY, launch_interval_s=0)
    with serve(emulator) as url:
        emulator.environ = {"LAMBDA_API_KEY": KEY, "LAMBDA_API_BASE_URL": url}
        emulator.client = LambdaClient(KEY, base_url=url, backoff=0.01, launch_interval_s=0)
        yield emulator


def launch(api, name: str, stack: str, *, hours_ago: float | None, max_hours: str = "2", max_cost: str = "8",
           managed: bool = True) -> str:
    tags = reap.tags(stack, load_stack(STACK).limits) if managed else []
    tags = [t for t in tags if t["key"] not in (reap.TAG_MAX_HOURS, reap.TAG_MAX_COST)]
    if managed:
        tags += [{"key": reap.TAG_MAX_HOURS, "value": max_hours}, {"key": reap.TAG_MAX_COST, "value": max_cost}]
    if hours_ago is not None:
        tags.append(reap.launched_at_tag(datetime.now(UTC) - timedelta(hours=hours_ago)))
    (instance_id,) = api.client.launch({"region_name": "us-south-2", "instance_type_name": "gpu_1x_h100_sxm5",
                                        "ssh_key_names": ["k"], "name": name, "tags": tags})
    return instance_id


def test_the_reaper_terminates_orphans_and_runs_past_their_limits_and_nothing_else(api):
    within = launch(api, "lorastack-live", "live", hours_ago=0.5)
    orphan = launch(api, "lorastack-gone", "gone", hours_ago=0.1)
    too_long = launch(api, "lorastack-slow", "slow", hours_ago=3)  # maxHours 2
    too_dear = launch(api, "lorastack-dear", "dear", hours_ago=1.5, max_hours="10", max_cost="3")  # $3.29/h
    no_clock = launch(api, "lorastack-noclock", "noclock", hours_ago=None)
    foreign = launch(api, "someone-elses", "live", hours_ago=50, managed=False)
    live = {"live", "slow", "dear", "noclock"}

    dry = {d.resource_id: d for d in BACKEND.reap(live, api.environ, dry_run=True, grace_minutes=10)}
    assert set(dry) == {within, orphan, too_long, too_dear, no_clock}  # never someone else's
    assert {i for i, d in dry.items() if d.terminate} == {orphan, too_long, too_dear, no_clock}
    assert "maxHours" in dry[too_long].reason and "maxCostUsd" in dry[too_dear].reason
    assert dry[within].cost_usd == pytest.approx(0.5 * 3.29, rel=0.01)
    assert len(api.billing()) == 6  # a dry run terminates nothing

    BACKEND.reap(live, api.environ, dry_run=False, grace_minutes=10)
    assert sorted(api.billing()) == sorted([within, foreign])


def test_the_reaper_without_a_lambda_key_looks_nowhere():
    assert BACKEND.reap({"x"}, {}, dry_run=True, grace_minutes=10) == []


def test_status_shows_the_stacks_instance_and_what_it_has_cost(api):
    config = load_stack(STACK)
    assert "no Lambda instance" in BACKEND.status(STACK, config, api.environ).lines[0]
    instance_id = launch(api, f"lorastack-{STACK}", STACK, hours_ago=1)
    text = "\n".join(BACKEND.status(STACK, config, api.environ).lines)
    assert instance_id in text and "$3.29/h" in text and "1.00 h" in text
    with pytest.raises(OpsError, match="LAMBDA_API_KEY"):
        BACKEND.status(STACK, config, {})


def test_live_prices_and_a_region_without_capacity(api):
    config = load_stack(STACK)
    live = BACKEND.live_prices(api.environ, timeout=5)
    assert "live instance types" in live.note
    assert config.usd_per_hour(live.data) == (3.29, "Lambda Cloud instance-types API (live)")
    assert BACKEND.live_warnings(config, live.data) == []
    api.capacity = {"gpu_1x_h100_sxm5": ("us-east-1",)}
    (warning,) = BACKEND.live_warnings(config, BACKEND.live_prices(api.environ, timeout=5).data)
    assert "no capacity in us-south-2" in warning and "us-east-1" in warning
    assert "LAMBDA_API_KEY is not set" in BACKEND.live_prices({}, timeout=5).note


def test_the_stack_schema_names_what_is_wrong():
    document = load_stack(STACK).model_dump(by_alias=True)
    with pytest.raises(ValueError, match="unknown Lambda instance type; allowed: .*gpu_1x_a10"):
        StackConfig.model_validate({**document, "lambda": {**document["lambda"], "instanceType": "gpu_1x_h900"}})
    with pytest.raises(ValueError, match="wait: true is not available with provider lambda"):
        StackConfig.model_validate({**document, "wait": True})
    config = load_stack(STACK)
    assert config.section is config.lambda_cloud  # the `lambda` section lives in the field lambda_cloud


def instance_props(**changes) -> dict:
    config = load_stack(STACK)
    return {"name": f"lorastack-{STACK}", "instanceTypeName": "gpu_1x_h100_sxm5", "regionName": "us-south-2",
            "sshKeyNames": ["k"], "fileSystemNames": [f"lorastack-{STACK}"],
            "userData": render(config.image.ref, {"LORASTACK_MANAGED": "1"}, f"lorastack-{STACK}"),
            "tags": reap.tags(STACK, config.limits), **changes}


def test_the_stacks_instance_and_filesystem_pass_the_policies():
    assert violations("lambda-instance-time-and-money-limits", INSTANCE_TYPE, instance_props()) == []
    assert violations("lambda-filesystems-kept-on-destroy", FILESYSTEM_TYPE,
                      {"name": f"lorastack-{STACK}", "region": "us-south-2", "keepOnDestroy": True}) == []


def test_an_instance_without_limits_or_above_the_budget_is_refused():
    untagged = violations("lambda-instance-time-and-money-limits", INSTANCE_TYPE, instance_props(tags=[]))
    assert any("reaper's marks" in v for v in untagged) and any("lorastack-max-hours" in v for v in untagged)
    dear = instance_props(tags=[t if t["key"] != reap.TAG_MAX_COST else {**t, "value": "500"} for t in instance_props()["tags"]])
    found = violations("lambda-instance-time-and-money-limits", INSTANCE_TYPE, dear)
    assert any("exceeds the policy's ceiling 100" in v for v in found) and any("above the stack's budget" in v for v in found)


def test_a_filesystem_deleted_on_destroy_needs_the_stack_file_to_say_so():
    found = violations("lambda-filesystems-kept-on-destroy", FILESYSTEM_TYPE,
                       {"name": f"lorastack-{STACK}", "region": "us-south-2", "keepOnDestroy": False})
    assert found and "lambda.filesystem.keepOnDestroy: false" in found[0]
