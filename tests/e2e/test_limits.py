"""The money limit is reached: a checkpoint is saved, the pod stops, and less than a minute is billed past the
limit, even though the container was killed and restarted on the way (the limit counts the run's whole life,
from the ledger in status.json, not the restarted process's)."""

from __future__ import annotations

import time

from contract.workspace import read_json
from infra.runpod_backend import catalog

LIMIT_SECONDS = 40  # long enough that a busy CPU's start-up and shutdown cannot blur counted from not counted


def test_the_money_limit_checkpoints_and_stops_across_a_container_restart(emulated):
    usd_per_hour = catalog.RUNPOD_GPUS["NVIDIA RTX A4000"].secure_usd
    max_cost = round(usd_per_hour * LIMIT_SECONDS / 3600, 6)
    # far below the run's estimate on purpose: what is tested is the trainer's own limit
    limits = {"maxHours": 1, "maxCostUsd": max_cost, "allowBelowEstimate": True}
    driver = emulated.driver(train={"steps": 2000, "checkpointEvery": 25}, limits=limits)
    outputs, _ = driver.up()
    pod_id, paths = outputs["podId"], emulated.volume_paths(outputs["volumeId"], outputs["runId"])

    deadline = time.monotonic() + 180  # generous: a loaded machine starts the trainer slowly
    # kill once the ledger holds half the limit: the restarted container then has about half left, so a
    # ledger that was not counted (the whole limit again) stands far from one that was, however busy the CPU
    while (read_json(paths.status) or {}).get("life", {}).get("seconds", 0) < LIMIT_SECONDS / 2:
        assert time.monotonic() < deadline, "the trainer's ledger never reached half the limit"
        time.sleep(0.1)
    emulated.runtime.kill_container(pod_id)  # an OOM kill: RunPod restarts the container

    assert emulated.runtime.wait_until_stopped(pod_id, timeout=LIMIT_SECONDS + 60)
    bill = emulated.runtime.bill(pod_id)
    status = read_json(paths.status)
    print(f"money limit: billed {bill.closed_seconds} s for a {LIMIT_SECONDS} s limit (${max_cost}), "
          f"{len(bill.containers)} containers, the second ran {bill.containers[-1].seconds(0):.1f} s; "
          f"ledger {status['life']['seconds']:.1f} s over {status['life']['starts']} starts")
    assert status["state"] == "limit" and "money limit" in status["message"]
    assert (paths.checkpoints / f"step-{status['step']}" / "trainer.json").is_file()  # saved where it stopped
    assert not paths.done.exists()
    assert len(bill.containers) == 2 and status["life"]["starts"] == 2
    # the restarted container alone ran less than the limit: the first one's time was counted
    assert bill.containers[1].seconds(0) < LIMIT_SECONDS
    assert bill.closed_seconds - LIMIT_SECONDS < 60
    driver.destroy()
