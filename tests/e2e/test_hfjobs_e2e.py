"""Hugging Face Jobs, the whole flow: the flux-hfjobs stack (training the demo's tiny SD 1.5) brought up and down by
the offline driver against emulator/hf_hub.py, whose jobs run the real trainer. The fault matrix RunPod has: a
clean run that ends by itself (and up twice changes nothing), a crash, the time and money limits, a lost machine
resumed from the Hub repo, destroy while training."""

from __future__ import annotations

import pytest

from infra.hfjobs_backend import runs
from infra.hfjobs_backend.catalog import FINAL_CHECKPOINT_S

from .conftest import probe_steps
from .hfjobs_fixtures import STACK  # its fixtures come through conftest.py

LIMIT_SECONDS = 20


def test_a_run_pushes_checkpoints_and_the_lora_ends_by_itself_and_up_twice_changes_nothing(hf_emulated, tmp_path):
    driver = hf_emulated.driver(train={"steps": 4, "checkpointEvery": 2})
    outputs, operations = driver.up()
    assert operations.counts == {"create": 2}  # the checkpoint repo and the job
    job_id, run = outputs["jobId"], hf_emulated.run_id(driver)
    assert hf_emulated.wait_ended(job_id) == "COMPLETED"
    files = hf_emulated.repo_files()
    assert f"runs/{run}/checkpoints/step-4/trainer.json" in files and f"runs/{run}/lora/README.md" in files
    assert hf_emulated.api.repos[hf_emulated.repo_id].private
    assert hf_emulated.api.billing_jobs() == []
    print(f"hfjobs run: billed {hf_emulated.api.bill(job_id).billed_minutes(0)} minute(s)")

    _, again = driver.up()
    assert again.counts == {"same": 2} and len(hf_emulated.api.jobs) == 1  # finished: no second job

    destination = tmp_path / "outputs"
    report = runs.fetch(STACK, hf_emulated.config(driver), destination,
                        {"HF_TOKEN": hf_emulated.token, "HF_ENDPOINT": hf_emulated.api.base_url})
    assert report.code == 0 and (destination / "README.md").is_file() and list(destination.glob("*.safetensors"))

    destroyed = driver.destroy()
    assert destroyed.counts == {"delete": 1, "retain": 1} and hf_emulated.repo_id in hf_emulated.api.repos


def test_a_crash_ends_the_job_in_error_and_stops_the_bill(hf_emulated):
    driver = hf_emulated.driver(train={"baseModel": "/workspace/models/not-there"})
    outputs, _ = driver.up()
    assert hf_emulated.wait_ended(outputs["jobId"]) == "ERROR"
    assert any("not-there" in line for line in hf_emulated.logs(outputs["jobId"]))
    assert hf_emulated.api.billing_jobs() == []
    assert driver.refresh().counts == {"gone": 1}  # ended unfinished: the next up would start a new job
    driver.destroy()


@pytest.mark.parametrize("limit", ["time", "money"])
def test_a_limit_checkpoints_to_the_repo_and_ends_the_job(hf_emulated, limit):
    hours = LIMIT_SECONDS / 3600
    limits = {"maxHours": round(hours, 6)} if limit == "time" else {"maxCostUsd": round(5.0 * hours, 6)}  # h200
    limits["allowBelowEstimate"] = True  # far below the run's estimate on purpose: the trainer's own limit is tested
    driver = hf_emulated.driver(train={"steps": 5000, "checkpointEvery": 25}, limits=limits)
    outputs, _ = driver.up()
    job_id, run = outputs["jobId"], hf_emulated.run_id(driver)
    # the platform's backstop: a minute at least, and time for the last checkpoint's upload
    assert hf_emulated.api.jobs[job_id].spec["timeoutSeconds"] == 60 + FINAL_CHECKPOINT_S
    assert hf_emulated.wait_ended(job_id, timeout=LIMIT_SECONDS + 180) == "ERROR"  # exit 75: stopped, resumable
    logs = hf_emulated.logs(job_id)
    assert any(f"{limit} limit" in line for line in logs), logs[-15:]
    assert hf_emulated.api.jobs[job_id].message != "Job timeout"  # the trainer stopped itself first
    assert any(name.startswith(f"runs/{run}/checkpoints/") and name.endswith("trainer.json")
               for name in hf_emulated.repo_files())  # saved where it stopped, in the repo
    assert hf_emulated.api.billing_jobs() == []
    driver.destroy()


def test_a_lost_machine_resumes_from_the_repo(hf_emulated, hf_faults):
    hf_faults.probe_steps = True
    train = {"steps": 16, "checkpointEvery": 4, "keepCheckpoints": 2}
    driver = hf_emulated.driver(train=train)
    outputs, _ = driver.up()
    lost = outputs["jobId"]
    hf_emulated.wait_for_log(lost, r"emulator-probe: step ([6-9]|1\d)$", timeout=180)
    reached = max(probe_steps(hf_emulated.api.lose_machine(lost)))

    assert driver.refresh().counts == {"gone": 1}  # the lost job leaves the state (the repo stays)
    outputs, operations = hf_emulated.driver(train=train).up()
    assert operations.counts == {"same": 1, "create": 1}
    resumed = outputs["jobId"]
    assert resumed != lost and hf_emulated.wait_ended(resumed) == "COMPLETED", "\n".join(hf_emulated.logs(resumed)[-30:])
    resumed_from = min(probe_steps(hf_emulated.logs(resumed))) - 1
    print(f"hfjobs lost machine: reached step {reached}, the new job resumed from {resumed_from}")
    assert resumed_from > 0 and 0 <= reached - resumed_from <= train["checkpointEvery"]
    assert f"runs/{hf_emulated.run_id(driver)}/lora/README.md" in hf_emulated.repo_files()
    driver.destroy()


def test_destroy_while_training_cancels_the_job_and_keeps_or_deletes_the_repo(hf_emulated):
    driver = hf_emulated.driver(train={"steps": 5000, "checkpointEvery": 2}, keep_repo=False)
    outputs, _ = driver.up()
    job_id = outputs["jobId"]
    hf_emulated.wait_for_log(job_id, r"checkpoints: step-2 copied to the Hub repo", timeout=180)
    destroyed = driver.destroy()
    assert destroyed.counts == {"delete": 2}  # keepOnDestroy: false: the repo goes too
    assert hf_emulated.wait_ended(job_id, timeout=60) == "CANCELED"
    assert hf_emulated.api.billing_jobs() == [] and hf_emulated.repo_id not in hf_emulated.api.repos
