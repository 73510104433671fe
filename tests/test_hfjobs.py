"""The Hugging Face Jobs backend against emulator/hf_hub.py through the real huggingface_hub client: the providers'
retry-safe create under injected faults, read and delete, the checkpoint mirror, the reaper's rules, and every
request our code sends checked against the contract notes (shared/reference/hf-jobs-api.md)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from cloudapi.checkpoint_mirror import HubCheckpointMirror
from cloudapi.hosts import HfJobHost, host_from_environment, mirror_from_environment
from contract.spec import ENV_CHECKPOINT_REPO, ENV_LIMITS, ENV_MANAGED, RunLimits
from contract.workspace import RunPaths
from emulator.hf_hub import HfHubApi
from emulator.server import Fault, serve
from infra.hfjobs_backend import catalog, runs
from infra.hfjobs_backend.client import LABEL_RUN, LABEL_STACK, HfJobs, managed_labels
from infra.hfjobs_backend.job import JobProvider
from infra.hfjobs_backend.repo import HubRepoProvider
from infra.stack_files import stack_file

TOKEN = "hf_test_token_for_the_jobs_emulator_0b"
USER = "alice"
IMAGE = "ghcr.io/lorastack/trainer:0.1.0"

# The contract notes, as (method, path) patterns: every request our code sends must match one.
CONTRACT = [
    ("GET", r"/api/whoami-v2"),
    ("GET", r"/api/jobs/hardware"),
    ("POST", r"/api/jobs/[^/]+"),
    ("GET", r"/api/jobs/[^/]+"),
    ("GET", r"/api/jobs/[^/]+/[^/]+"),
    ("POST", r"/api/jobs/[^/]+/[^/]+/cancel"),
    ("GET", r"/api/jobs/[^/]+/[^/]+/logs"),
    # the Hub calls of create_repo, delete_repo, model_info, update_repo_settings, upload_folder, list_repo_files
    # and snapshot_download (huggingface_hub 2.4.0: hf_api.py, _commit_api.py, _snapshot_download.py, file_download.py)
    ("POST", r"/api/repos/create"),
    ("DELETE", r"/api/repos/delete"),
    ("POST", r"/api/validate-yaml"),
    ("GET", r"/api/models/[^/]+/[^/]+(/revision/[^/]+)?"),
    ("PUT", r"/api/models/[^/]+/[^/]+/settings"),
    ("GET", r"/api/models/[^/]+/[^/]+/tree/[^/]+(/.+)?"),
    ("POST", r"/api/models/[^/]+/[^/]+/preupload/[^/]+"),
    ("POST", r"/api/models/[^/]+/[^/]+/commit/[^/]+"),
    ("GET", r"/[^/]+/[^/]+/resolve/[^/]+/.+"),
    ("HEAD", r"/[^/]+/[^/]+/resolve/[^/]+/.+"),
    # not ours: the client fetches its registry of AI agent harnesses at most once a day (utils/_detect_agent.py)
    ("GET", r"/api/agent-harnesses"),
]
# JobSpec as `_create_job_spec` builds it: field -> JSON type
JOB_SPEC = {"command": list, "arguments": list, "environment": dict, "flavor": str, "secrets": dict,
            "timeoutSeconds": int, "attempts": int, "labels": dict, "volumes": list, "expose": dict, "ssh": dict,
            "network": dict, "resourceGroupId": str, "dockerImage": str, "spaceId": str}


def contract_violations(api: HfHubApi) -> list[str]:
    problems = [f"{method} {path}: not in the contract" for method, path in api.requests
                if not any(method == m and re.fullmatch(p, path) for m, p in CONTRACT)]
    for method, path, body in api.bodies:
        if method == "POST" and re.fullmatch(r"/api/jobs/[^/]+", path):
            problems += [f"JobSpec.{key}: unknown field" for key in body if key not in JOB_SPEC]
            problems += [f"JobSpec.{key}: {type(value).__name__}, the contract says {JOB_SPEC[key].__name__}"
                         for key, value in body.items() if key in JOB_SPEC and type(value) is not JOB_SPEC[key]]
            problems += [f"JobSpec.{key}: missing" for key in ("command", "dockerImage", "flavor", "timeoutSeconds",
                                                               "labels", "environment") if key not in body]
            problems += [f"JobSpec.{part}: values must be strings" for part in ("environment", "secrets", "labels")
                         if any(not isinstance(value, str) for value in (body.get(part) or {}).values())]
    return problems


@pytest.fixture
def hub(tmp_path, monkeypatch):
    api = HfHubApi(tmp_path / "hub", token=TOKEN, user=USER, trainer_repositories=())
    with serve(api) as url:
        api.base_url = url
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield api
        assert contract_violations(api) == []
    api.shutdown()


def job_props(stack: str = "s1", **changes) -> dict:
    limits = RunLimits(max_hours=1, max_cost_usd=2, usd_per_hour=1.0).model_dump_json(by_alias=True)
    return {"namespace": None, "image": IMAGE, "flavor": "a10g-small", "command": ["python", "-m", "training"],
            "environment": {ENV_MANAGED: "1", ENV_LIMITS: limits}, "secrets": {"HF_TOKEN": TOKEN},
            "timeoutSeconds": 3600, "labels": managed_labels(stack, f"{stack}-run"), **changes}


def provider() -> JobProvider:
    return JobProvider(retries=3, backoff=0.01, landing_s=2.0)


# --- the job provider --------------------------------------------------------------------------------------------


def test_create_sends_a_job_spec_with_the_timeout_the_secrets_and_our_labels(hub):
    created = provider().create(job_props())
    (job,) = hub.jobs.values()
    assert created.id == job.id and created.outs["stage"] in ("SCHEDULING", "RUNNING")
    assert job.namespace == USER and job.spec["timeoutSeconds"] == 3600 and job.spec["dockerImage"] == IMAGE
    assert job.spec["secrets"] == {"HF_TOKEN": TOKEN} and TOKEN not in json.dumps(job.spec["environment"])
    assert job.spec["labels"][LABEL_STACK] == "s1" and job.spec["labels"][ENV_MANAGED] == "1"


@pytest.mark.parametrize("fault", ["lost answer", "500", "429", "timeout"])
def test_create_after_a_failed_or_lost_answer_makes_exactly_one_job(hub, fault):
    if fault == "lost answer":
        hub.lose_answers("POST", f"/api/jobs/{USER}")  # created, but the answer never arrives
    elif fault == "timeout":
        hub.inject(Fault(status=500, method="POST", path_prefix=f"/api/jobs/{USER}", delay=0.5))
    else:
        hub.inject(Fault(status=int(fault), method="POST", path_prefix=f"/api/jobs/{USER}", count=2))
    created = provider().create(job_props())
    assert list(hub.jobs) == [created.id]


def test_a_live_job_of_another_stack_is_not_adopted(hub):
    other = provider().create(job_props("other"))
    mine = provider().create(job_props("s1"))
    assert other.id != mine.id and len(hub.jobs) == 2


def test_check_refuses_a_missing_timeout_an_unknown_flavor_and_unlabelled_jobs():
    result = provider().check({}, job_props(timeoutSeconds=None, flavor="a10g-huge", labels={"name": "x"},
                                            image="ghcr.io/lorastack/trainer:latest"))
    assert {failure.property for failure in result.failures} == {"timeoutSeconds", "flavor", "labels", "image"}
    assert provider().check({}, job_props(timeoutSeconds=3600.0)).failures == []  # Pulumi's numbers are floats


def test_every_input_replaces_the_job_old_one_first():
    diff = provider().diff("id", job_props(), job_props(flavor="l40sx1"))
    assert diff.changes and diff.replaces == ["flavor"] and diff.delete_before_replace
    assert not provider().diff("id", job_props(), job_props(timeoutSeconds=3600.0)).changes


def test_read_keeps_a_running_or_completed_job_and_drops_one_that_ended_unfinished(hub):
    job_id = provider().create(job_props()).id
    assert provider().read(job_id, job_props()).id == job_id
    hub.end(hub.jobs[job_id], "COMPLETED", None)
    assert provider().read(job_id, job_props()).id == job_id  # finished: up twice creates nothing
    hub.jobs[job_id].stage = "ERROR"
    assert provider().read(job_id, job_props()).id == ""  # lost or failed: the next up starts a job that resumes
    assert provider().read("f" * 24, job_props()).id == ""


def test_delete_cancels_a_running_job_and_leaves_an_ended_one(hub):
    running = provider().create(job_props("a")).id
    ended = provider().create(job_props("b")).id
    hub.end(hub.jobs[ended], "COMPLETED", None)
    hub.inject(Fault(status=503, method="POST", path_prefix=f"/api/jobs/{USER}/{running}/cancel"))
    provider().delete(running, job_props("a"))
    provider().delete(ended, job_props("b"))
    provider().delete("f" * 24, job_props("c"))  # already gone: nothing to do
    assert hub.jobs[running].stage == "CANCELED" and hub.jobs[ended].stage == "COMPLETED"
    assert hub.billing_jobs() == []


def test_the_timeout_is_the_sooner_limit_in_whole_minutes_with_time_for_the_last_checkpoint():
    last = catalog.FINAL_CHECKPOINT_S
    assert catalog.timeout_seconds(2, 6, 5.0) == 72 * 60 + last  # $6 at $5/h: 1.2 h
    assert catalog.timeout_seconds(0.5, 100, 5.0) == 30 * 60 + last
    assert catalog.timeout_seconds(1, 1.01, 60.0) == 60 + last  # never under a minute
    assert catalog.timeout_seconds(1, 0.999, 1.0) == 59 * 60 + last  # rounded down


# --- the checkpoint repo -----------------------------------------------------------------------------------------


def test_the_repo_is_created_private_adopted_when_it_exists_and_deleted_only_when_asked(hub):
    repos = HubRepoProvider()
    created = repos.create({"repoId": f"{USER}/ckpt", "private": True})
    assert hub.repos[f"{USER}/ckpt"].private and created.id == f"{USER}/ckpt"
    assert repos.create({"repoId": f"{USER}/ckpt", "private": True}).id == created.id  # a retry adopts it
    assert repos.read(created.id, {"repoId": created.id, "private": True}).outs["private"] is True
    repos.update(created.id, {}, {"repoId": created.id, "private": False})
    assert not hub.repos[created.id].private
    repos.delete(created.id, {})
    assert created.id not in hub.repos and repos.read(created.id, {}).id == ""


# --- the trainer's side: host and checkpoint mirror -------------------------------------------------------------


def test_a_job_is_its_own_host_with_nothing_to_stop():
    host = host_from_environment({"JOB_ID": "abc", "LORASTACK_WORKSPACE": "/tmp/w"}, print)
    assert isinstance(host, HfJobHost) and host.machine_id == "abc" and host.stop(0, 0)
    assert host.billed_usd_per_hour() is None and str(host.storage_root()) == "/tmp/w"


def write_checkpoint(paths: RunPaths, step: int, complete: bool = True) -> Path:
    directory = paths.checkpoints / f"step-{step}"
    directory.mkdir(parents=True)
    (directory / "lora.safetensors").write_bytes(bytes([step]) * 64)
    if complete:
        (directory / "trainer.json").write_text(json.dumps({"step": step}))
    return directory


def test_the_mirror_pushes_checkpoints_and_results_and_a_fresh_disk_resumes_from_the_newest(hub, tmp_path):
    logged: list[str] = []
    environ = {ENV_CHECKPOINT_REPO: f"{USER}/ckpt", "HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.base_url}
    mirror = mirror_from_environment(environ)
    assert isinstance(mirror, HubCheckpointMirror)
    lost = RunPaths(tmp_path / "lost-disk", "run-1")
    mirror.restore(lost, logged.append)  # no repo yet: a first run
    assert logged == []
    for step in (2, 4):
        mirror.push_checkpoint(lost, write_checkpoint(lost, step))
    repo = hub.repos[f"{USER}/ckpt"]
    assert repo.private and "runs/run-1/checkpoints/step-4/trainer.json" in repo.files
    # the job's results: everything but the checkpoints, which are there already
    lost.lora.mkdir(parents=True)
    (lost.lora / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    (lost.run / "status.json").write_text('{"state": "succeeded"}')
    (lost.run / "DONE").write_text("{}")
    assert mirror.push_results(lost) == 3
    assert {"runs/run-1/lora/pytorch_lora_weights.safetensors", "runs/run-1/status.json", "runs/run-1/DONE"} <= set(repo.files)

    fresh = RunPaths(tmp_path / "fresh-disk", "run-1")
    mirror_from_environment(environ).restore(fresh, logged.append)
    assert (fresh.checkpoints / "step-4" / "lora.safetensors").read_bytes() == bytes([4]) * 64
    assert not (fresh.checkpoints / "step-2").exists() and not (fresh.root / ".mirror-download").exists()
    assert logged == [f"restored runs/run-1/checkpoints/step-4 from the Hub repo {USER}/ckpt"]
    other = RunPaths(tmp_path / "o", "run-2")
    mirror.restore(other, logged.append)
    assert not other.checkpoints.exists()


def test_a_mirror_the_hub_refuses_costs_the_resume_not_the_run(hub, tmp_path, monkeypatch, capsys):
    from training import checkpoints, lifecycle

    wrong = "hf_not_the_token_of_anyone_at_all_00"
    environ = {ENV_CHECKPOINT_REPO: f"{USER}/ckpt", "HF_TOKEN": wrong, "HF_ENDPOINT": hub.base_url}
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    paths = RunPaths(tmp_path, "run-1")
    checkpoints._mirror(paths, write_checkpoint(paths, 2))  # logged, training goes on
    lifecycle.restore_from_mirror(RunPaths(tmp_path / "fresh", "run-1"), environ)  # starts from this disk
    paths.lora.mkdir(parents=True)
    (paths.lora / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    assert lifecycle.push_to_mirror(paths, environ) is False  # the result has no copy: the caller says so
    err = capsys.readouterr().err
    assert "could not mirror step-2" in err and "could not restore from the mirror" in err
    assert "could not mirror the run's files" in err and wrong not in err


# --- ops: status, fetch, reap -------------------------------------------------------------------------------------


def limits_json(max_hours: float, max_cost: float) -> str:
    return RunLimits(max_hours=max_hours, max_cost_usd=max_cost).model_dump_json(by_alias=True)


def test_the_reaper_cancels_orphans_and_jobs_past_their_limits_only(hub):
    jobs = HfJobs(TOKEN, retries=1, backoff=0.01)
    orphan = provider().create(job_props("gone")).id
    within = provider().create(job_props("live")).id
    over = provider().create(job_props("late", environment={ENV_MANAGED: "1", ENV_LIMITS: limits_json(0.5, 100)})).id
    foreign = jobs.api.run_job(image="python:3.12", command=["sleep", "1"], timeout=60).id  # not ours
    later = datetime.now(UTC) + timedelta(hours=1)
    decisions = {d.resource_id: d for d in runs.reap(jobs, {"live", "late"}, dry_run=False, now=later,
                                                      grace_minutes=10)}
    assert set(decisions) == {orphan, within, over} and foreign not in decisions
    assert decisions[orphan].terminate and decisions[over].terminate and not decisions[within].terminate
    assert {hub.jobs[i].stage for i in (orphan, over)} == {"CANCELED"} and hub.jobs[within].stage != "CANCELED"
    assert hub.jobs[foreign].stage != "CANCELED"


def test_the_live_prices_come_from_the_hardware_api(hub):
    from infra.hfjobs_backend.backend import BACKEND

    live = BACKEND.live_prices({"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.base_url}, timeout=5)
    assert live.data["h200"]["unitLabel"] == "minute"
    price, source = catalog.hfjobs_usd_per_hour("h200", live.data)
    assert price == pytest.approx(5.0) and source == catalog.LIVE_PRICES_SOURCE


def test_a_new_job_needs_labels_to_be_found_by_its_stack(hub):
    created = provider().create(job_props("s1"))
    found = runs.stack_jobs(HfJobs(TOKEN), "s1")
    assert [job.id for job in found] == [created.id] and found[0].labels[LABEL_RUN] == "s1-run"


def stack_config(**changes):
    from infra.stack_files import parse_stack

    raw = yaml.safe_load(stack_file("flux-hfjobs").read_text())["config"]
    return parse_stack({**raw, **changes}, "flux-hfjobs")


def test_status_and_logs_of_a_stack_come_from_its_newest_job(hub):
    config = stack_config(**{"lorastack:hfjobs": {"flavor": "h200", "namespace": USER,
                                                  "checkpointRepo": {"repoId": f"{USER}/ckpt"}}})
    environ = {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.base_url}
    assert runs.status("flux-hfjobs", config, environ).code == 1  # nothing yet
    job_id = provider().create(job_props("flux-hfjobs")).id
    hub.append_log(hub.jobs[job_id], "step 1/4")
    hub.end(hub.jobs[job_id], "COMPLETED", None)
    (line,) = runs.status("flux-hfjobs", config, environ).lines
    assert job_id in line and "COMPLETED" in line
    emitted: list[str] = []
    report = runs.logs("flux-hfjobs", config, environ, emitted.append)
    assert emitted == ["step 1/4"] and "COMPLETED" in report.lines[0]


@pytest.mark.parametrize(("changes", "says"), [
    ({"lorastack:wait": True}, "wait: true is not offered for hfjobs"),
    ({"lorastack:hfjobs": {"flavor": "a10g-huge", "checkpointRepo": {"repoId": "a/b"}}}, "l40sx1"),
    ({"lorastack:hfjobs": {"flavor": "t4-small", "checkpointRepo": {"repoId": "a/b"}}}, "hfjobs.flavor 't4-small'"),
    ({"lorastack:hfjobs": {"flavor": "h200", "checkpointRepo": {"repoId": "no-namespace"}}}, "namespace/name"),
])
def test_a_bad_hfjobs_section_names_the_key_and_what_is_allowed(changes, says):
    from infra.stack_files import StackError

    with pytest.raises(StackError) as error:
        stack_config(**changes)
    assert says in str(error.value)


def test_a_lost_answer_on_create_during_up_still_makes_one_job(hub, tmp_path):
    from emulator.stack_driver import StackDriver

    hub.lose_answers("POST", f"/api/jobs/{USER}")
    hub.inject(Fault(status=503, method="GET", path_prefix="/api/whoami-v2"))
    overrides = {"lorastack:hfjobs": {"flavor": "h200", "checkpointRepo": {"repoId": f"{USER}/ckpt"}}}
    driver = StackDriver("flux-hfjobs", tmp_path, secrets={"hfToken": TOKEN}, overrides=overrides)
    outputs, operations = driver.up()
    assert operations.counts == {"create": 2} and list(hub.jobs) == [outputs["jobId"]]
    assert driver.destroy().counts == {"delete": 1, "retain": 1} and hub.billing_jobs() == []
