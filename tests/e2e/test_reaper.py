"""The reaper on the emulator: lorastack pods past their limits or without a live stack are terminated;
pods within their limits, stopped pods and other people's pods are left alone."""

from __future__ import annotations

import io
import time

from infra import reaper

from .conftest import json_env

GPU = {"id": "NVIDIA RTX A4000", "count": 1}


def make_pod(client, name: str, *, stack: str | None = None, max_hours: float = 1.0, managed: bool = True) -> str:
    env = {"LORASTACK_LIMITS": json_env({"maxHours": max_hours, "maxCostUsd": 5})}
    if managed:
        env.update(LORASTACK_MANAGED="1", LORASTACK_STACK=stack or name.removeprefix("lorastack-"))
    pod = client.create_pod({"name": name, "image": "ghcr.io/lorastack/trainer:0.1.0", "gpu": GPU, "env": env})
    return pod["id"]


def test_the_reaper_terminates_pods_past_their_limits_or_without_a_live_stack(api_only):
    client = api_only.client
    over = make_pod(client, "lorastack-demo", max_hours=0.5 / 3600)  # half a second
    orphan = make_pod(client, "lorastack-deleted-stack")
    within = make_pod(client, "lorastack-sdxl-4090")
    stopped = make_pod(client, "lorastack-sd15-3090", max_hours=0.5 / 3600)
    client.pod_action(stopped, "stop")
    foreign = make_pod(client, "lorastack-someone-elses", managed=False)
    time.sleep(1.5)

    live = reaper.stacks_with_files()
    assert {"demo", "sdxl-4090", "sd15-3090"} <= live and "deleted-stack" not in live
    planned = reaper.reap(live, {"RUNPOD_API_KEY": api_only.api_key}, dry_run=True, grace_minutes=0)
    assert {d.resource_id: d.terminate for d in planned} == {over: True, orphan: True, within: False, stopped: False}
    assert len(api_only.api.pods) == 5  # a dry run terminates nothing

    out = io.StringIO()
    assert reaper.main(["--grace-minutes", "0"], out=out) == 0
    print(out.getvalue())
    assert set(api_only.api.pods) == {within, stopped, foreign}
    assert "past maxHours" in out.getvalue() and "no live stack 'deleted-stack'" in out.getvalue()

    out = io.StringIO()  # CI names the live stacks: the others' pods go too
    assert reaper.main(["--stacks", "sd15-3090"], out=out) == 0
    assert set(api_only.api.pods) == {stopped, foreign}
