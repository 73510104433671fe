"""The demo's flow as a test: up (wait: true) trains on the emulated pod, the pod stops itself, the LoRA is
downloaded, the overhead stays under 10 %, and destroy leaves nothing running or billing."""

from __future__ import annotations

from pathlib import Path

from emulator.demo import MAX_OVERHEAD_RATIO, overhead_ratio


def test_up_trains_downloads_the_lora_and_destroy_leaves_nothing(emulated):
    driver = emulated.driver(wait=True)
    outputs, operations = driver.up()
    assert operations.counts == {"create": 2}
    run = outputs["run"]
    assert run["state"] == "succeeded" and (run["step"], run["total"]) == (4, 4)
    assert (Path(run["lora"]) / "pytorch_lora_weights.safetensors").is_file()

    pod_id = outputs["podId"]
    assert emulated.runtime.wait_until_stopped(pod_id, timeout=30)
    bill = emulated.runtime.bill(pod_id)
    ratio, trained_seconds = overhead_ratio(bill)
    print(f"demo run: billed {bill.closed_seconds} s (${bill.cost_usd(0):.5f}), trainer {trained_seconds:.1f} s, "
          f"overhead ratio {ratio:.3f}")
    assert bill.restarts == 0  # the trainer stopped its pod: RunPod never restarted the container
    assert ratio < MAX_OVERHEAD_RATIO

    destroyed = driver.destroy()
    assert destroyed.counts == {"delete": 2}  # the demo volume is not kept
    assert emulated.api.pods == {} and emulated.api.volumes == {}
    assert emulated.runtime.billing_pods() == []
