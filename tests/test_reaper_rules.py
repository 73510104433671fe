"""The reaper's rules on pod JSON as RunPod's v2 API returns it (no server needed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from infra.reaper import DEFAULT_GRACE_MINUTES
from infra.runpod_backend import reap

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def pod(status: str, hours_ago: float, cost: float) -> dict:
    started = (NOW - timedelta(hours=hours_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "id": f"pod-{status.lower()}", "name": "lorastack-sdxl-4090", "status": status, "cost": cost,
        "env": {"LORASTACK_MANAGED": "1", "LORASTACK_STACK": "sdxl-4090",
                "LORASTACK_LIMITS": json.dumps({"maxHours": 2, "maxCostUsd": 5})},
        "createdAt": started, "startedAt": started,
    }


def test_a_pod_in_error_still_bills_and_is_held_to_its_limits():
    # the spec: a pod's cost is 0.0 only when EXITED or TERMINATED; an ERROR pod is billed, and its trainer
    # is not running to stop it
    decision = reap.decide(pod("ERROR", hours_ago=30, cost=0.59), {"sdxl-4090"}, NOW, DEFAULT_GRACE_MINUTES)
    assert decision.terminate and "past maxHours" in decision.reason


def test_a_stopped_pod_of_a_live_stack_is_left_alone():
    decision = reap.decide(pod("EXITED", hours_ago=30, cost=0.0), {"sdxl-4090"}, NOW, DEFAULT_GRACE_MINUTES)
    assert not decision.terminate
