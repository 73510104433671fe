"""`python -m infra.affected`, `make cost` and `make status|logs|fetch`, against a temporary git repository and
the RunPod emulator (plus a few routes of our own where a test needs prices the emulator does not serve)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cloudapi.runpod_rest import RunpodClient
from contract.naming import pod_name, run_id
from contract.progress import progress_record
from contract.workspace import RunPaths, atomic_write_json
from emulator.runpod import RunpodApi
from emulator.server import Fault, JsonApi, serve
from infra import affected, cost, ops, progress
from infra import paths as project_paths
from infra.runpod_backend import runs
from infra.stack_files import load_stack, parse_stack

API_KEY = "rp-test-key-4f1c9a"


# --- infra.affected ---------------------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    _git(tmp_path, "init", "-q", "-b", "main")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    for name in ("alpha", "beta", "demo"):
        (tmp_path / "stacks").mkdir(exist_ok=True)
        (tmp_path / "stacks" / f"Pulumi.{name}.yaml").write_text(f"config: {{lorastack:provider: runpod}} # {name}\n")
    (tmp_path / "infra").mkdir()
    (tmp_path / "infra" / "program.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("readme\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "base")
    _git(tmp_path, "checkout", "-q", "-b", "change")
    return tmp_path


def _affected(repo: Path, capsys, *extra: str) -> tuple[list[str], str]:
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "change")
    assert affected.main(["--base", "main", "--json", "--root", str(repo), *extra]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_a_changed_stack_file_affects_that_stack_only(repo, capsys):
    (repo / "stacks" / "Pulumi.alpha.yaml").write_text("config: {lorastack:provider: replicate}\n")
    stacks, reason = _affected(repo, capsys)
    assert stacks == ["alpha"]
    assert "alpha" in reason


def test_a_change_to_shared_code_affects_every_stack_but_the_local_demo(repo, capsys):
    (repo / "infra" / "program.py").write_text("x = 2\n")
    (repo / "stacks" / "Pulumi.alpha.yaml").write_text("config: {}\n")
    stacks, reason = _affected(repo, capsys)
    assert stacks == ["alpha", "beta"]
    assert "infra/program.py" in reason


def test_a_change_elsewhere_affects_nothing_and_a_deleted_stack_is_named(repo, capsys):
    (repo / "README.md").write_text("new\n")
    (repo / "stacks" / "Pulumi.beta.yaml").unlink()
    stacks, reason = _affected(repo, capsys)
    assert stacks == []
    assert "Pulumi.beta.yaml was deleted" in reason and "make destroy STACK=beta" in reason


def test_the_base_is_the_merge_base_so_main_moving_on_does_not_leak_in(repo, capsys):
    (repo / "stacks" / "Pulumi.alpha.yaml").write_text("config: {}\n")
    _git(repo, "commit", "-q", "-am", "pr change")
    _git(repo, "checkout", "-q", "main")
    (repo / "infra" / "program.py").write_text("x = 3\n")  # a later commit on main, not in the PR
    _git(repo, "commit", "-q", "-am", "main moves on")
    _git(repo, "checkout", "-q", "change")
    assert affected.main(["--base", "main", "--root", str(repo)]) == 0
    assert capsys.readouterr().out.split() == ["alpha"]


def test_a_first_push_without_a_base_commit_affects_every_stack(repo, capsys):
    assert affected.main(["--base", "0" * 40, "--json", "--root", str(repo)]) == 0
    assert json.loads(capsys.readouterr().out) == ["alpha", "beta"]


def test_an_unknown_base_fails_with_a_hint(repo, capsys):
    assert affected.main(["--base", "no-such-ref", "--root", str(repo)]) == 2
    assert "fetch-depth: 0" in capsys.readouterr().err


# --- infra.cost -------------------------------------------------------------------------------------------------


@pytest.fixture()
def no_credentials(monkeypatch):
    for name in ("RUNPOD_API_KEY", "REPLICATE_API_TOKEN", "HF_TOKEN", "LORASTACK_WORKSPACE",
                 runs.S3_ACCESS_KEY_ENV, runs.S3_SECRET_KEY_ENV, "RUNPOD_API_BASE_URL", "REPLICATE_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def test_cost_without_a_key_prints_every_stack_from_the_dated_table(no_credentials, capsys):
    assert cost.main([]) == 0
    out = capsys.readouterr().out
    for stack in cost.all_stacks():
        estimate = load_stack(stack).cost_estimate().as_outputs()
        row = next(line for line in out.splitlines() if line.startswith(stack + " "))
        assert f"${estimate['estimatedCostUsd']:.2f}" in row
        assert f"${estimate['usdPerHour']:g}" in row
        assert row.endswith(estimate["priceSource"])
        # the table says how old it is, or the price is the stack's own (a local GPU)
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", row) or "undated copy" in row or "set by the stack" in row
    assert "RUNPOD_API_KEY is not set" in out


def _catalog_api(price: float) -> JsonApi:
    api = JsonApi()
    api.route("GET", "/v2/catalog/gpus", lambda request: {"gpus": [
        {"id": "NVIDIA GeForce RTX 4090", "name": "RTX 4090", "memory": 24, "price": {"secure": price, "community": 0.3}},
    ]})
    return api


def test_cost_uses_the_live_catalog_price_and_says_so(no_credentials, monkeypatch, capsys):
    with serve(_catalog_api(0.50)) as base_url:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", base_url)
        monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
        assert cost.main(["sdxl-4090"]) == 0
    out = capsys.readouterr().out
    live = load_stack("sdxl-4090").cost_estimate({"NVIDIA GeForce RTX 4090": {"price": {"secure": 0.50}}})
    row = next(line for line in out.splitlines() if line.startswith("sdxl-4090"))
    assert "$0.5 " in row and f"${live.usd:.2f}" in row and "(live)" in row
    assert "live GPU catalog (GET /v2/catalog/gpus), fetched" in out
    assert API_KEY not in out


def test_cost_falls_back_to_the_table_when_the_api_is_slow(no_credentials, monkeypatch, capsys):
    api = _catalog_api(0.50)
    api.inject(Fault(status=0, delay=1.0))  # answers, but after the timeout
    monkeypatch.setattr(cost, "LIVE_TIMEOUT_S", 0.2)
    with serve(api) as base_url:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", base_url)
        monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
        assert cost.main(["sdxl-4090"]) == 0
    out = capsys.readouterr().out
    assert "$0.59" in out and "copied 2026-11-24" in out
    assert "the catalog API did not answer usefully" in out


def _with_limits(stack: str, **limits: float):
    config = load_stack(stack)
    return config.model_copy(update={"limits": config.limits.model_copy(update=limits)})


def test_an_estimate_over_the_money_limit_warns_how_far_the_run_gets(no_credentials):
    config = _with_limits("sdxl-4090", max_cost_usd=0.2)
    estimate = config.cost_estimate()
    warnings = cost.limit_warnings(config, estimate)
    assert len(warnings) == 1 and "limits.maxCostUsd $0.2" in warnings[0]
    reachable = int(warnings[0].split("stopped after about ")[1].split()[0])
    hours_paid = 0.2 / estimate.usd_per_hour
    expected = int((hours_paid - 600 / 3600) / (estimate.seconds_per_step / 3600))
    assert reachable == expected and 0 < reachable < config.train.steps


def test_an_estimate_over_the_time_limit_warns_in_the_markdown_comment(no_credentials):
    config = _with_limits("flux-h100", max_hours=0.25)
    live = cost.LivePrices({}, ["dated tables only (--offline)"])
    markdown = cost.render_markdown([cost.cost_row("flux-h100", config, live)], live)
    assert "> **Warning** `flux-h100`: estimate" in markdown and "limits.maxHours 0.25 h" in markdown
    header, rule = markdown.splitlines()[4:6]
    assert header.startswith("| stack | provider | GPU / SKU | $/hour") and rule == "|" + "---|" * len(cost.COLUMNS)


def test_an_estimate_within_limits_has_no_warning(no_credentials):
    config = load_stack("sdxl-4090")
    assert cost.limit_warnings(config, config.cost_estimate()) == []


REPLICATE_STACK = {
    "lorastack:provider": "replicate",
    "lorastack:replicate": {"owner": "acme", "model": "flux-style", "hardware": "gpu-h100"},
    "lorastack:limits": {"maxHours": 2, "maxCostUsd": 10},
    "lorastack:train": {"family": "flux", "baseModel": "black-forest-labs/FLUX.1-dev",
                        "dataset": {"source": "https://example.com/d.zip"}, "steps": 1000},
}


def test_a_replicate_sku_missing_from_the_hardware_list_is_flagged(no_credentials, monkeypatch, capsys):
    api = JsonApi()
    api.route("GET", "/v1/hardware", lambda request: [{"name": "Nvidia T4 GPU", "sku": "gpu-t4"}])
    config = parse_stack(REPLICATE_STACK, "test")
    with serve(api) as base_url:
        monkeypatch.setenv("REPLICATE_BASE_URL", base_url)
        monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_secret_token")
        live = cost.fetch_live_prices({"replicate"})
    row = cost.cost_row("flux-replicate", config, live)
    assert any("no longer lists hardware 'gpu-h100'" in warning for warning in row.warnings)
    assert row.outputs == config.cost_estimate().as_outputs()  # the stack outputs' numbers
    assert "SKUs checked against it" in live.notes[0]


# --- infra.ops: status and logs against the RunPod emulator ----------------------------------------------------


@pytest.fixture()
def runpod(no_credentials, monkeypatch):
    api = RunpodApi(api_key=API_KEY)
    with serve(api) as base_url:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", base_url)
        monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
        monkeypatch.setattr(runs, "STATUS_READ_TIMEOUT_S", 0.5)
        yield api, RunpodClient(API_KEY, base_url=base_url)
        for pod_id in list(api.pods):  # ends the log streams still open
            api._terminate(pod_id)


def _start_pod(client: RunpodClient, stack: str) -> str:
    volume = client.create_volume({"name": pod_name(stack), "size": 20, "dataCenter": "EU-RO-1"})
    pod = client.create_pod({
        "name": pod_name(stack), "image": "ghcr.io/lorastack/trainer:0.1.0", "cloud": "SECURE",
        "gpu": {"id": "NVIDIA GeForce RTX 4090", "count": 1}, "dataCenterIds": ["EU-RO-1"],
        "mounts": {"network": [{"volumeId": volume["id"], "path": "/workspace"}]},
    })
    return pod["id"]


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = ops.main(list(argv), out=out)
    return code, out.getvalue()


def test_status_reads_the_newest_progress_line_from_the_pod_log(runpod):
    api, client = runpod
    pod_id = _start_pod(client, "sdxl-4090")
    api.append_log(pod_id, progress_record("running", 1, 1500, loss=0.2, lr=1e-4, cost_usd=0.0))
    api.append_log(pod_id, "step 120/1500 loss 0.1234 lr 1.0e-04 1.10 s/step ETA 25m18s cost $0.03 (est. $0.28)")
    api.append_log(pod_id, progress_record("running", 120, 1500, loss=0.1234, lr=1e-4, seconds_per_step=1.1,
                                           eta_seconds=1518.0, cost_usd=0.03, estimated_cost_usd=0.28))
    api.append_log(pod_id, "samples at step 120: 2 images in /workspace/runs/x/samples")
    started = time.monotonic()
    code, out = _run("status", "sdxl-4090")
    assert code == 0 and time.monotonic() - started < 5
    header, _, row = out.splitlines()[:3]
    assert header.split()[:3] == ["pod", "state", "step"]
    assert row.split()[:7] == [pod_id, "RUNNING", "120/1500", "0.1234", "1.10", "25m18s", "$0.03"]
    assert row.endswith("pod log")


def test_status_of_a_finished_run_shows_the_trainers_last_word(runpod):
    api, client = runpod
    pod_id = _start_pod(client, "sdxl-4090")
    api.append_log(pod_id, "succeeded: LoRA exported (step 1500/1500, 28m01s, cost $0.28)")
    api.append_log(pod_id, progress_record("succeeded", 1500, 1500, cost_usd=0.28))
    api.set_status(pod_id, "EXITED")
    code, out = _run("status", "sdxl-4090")
    assert code == 0
    assert out.splitlines()[2].split()[:4] == [pod_id, "EXITED", "(succeeded)", "1500/1500"]


def test_status_prefers_status_json_when_the_volume_is_mounted_here(runpod, tmp_path, monkeypatch):
    _, client = runpod
    pod_id = _start_pod(client, "sdxl-4090")
    config = load_stack("sdxl-4090")
    paths = RunPaths(tmp_path, run_id("sdxl-4090", config.train))
    atomic_write_json(paths.status, {"state": "running", "step": 700, "total": 1500, "loss": 0.0812,
                                     "seconds_per_step": 1.05, "eta_seconds": 840, "cost_usd": 0.1234})
    monkeypatch.setenv("LORASTACK_WORKSPACE", str(tmp_path))
    code, out = _run("status", "sdxl-4090")
    assert code == 0
    assert out.splitlines()[2].split() == [pod_id, "RUNNING", "700/1500", "0.0812", "1.05", "14m00s", "$0.12",
                                           "status.json"]


def test_status_without_a_pod_says_how_to_start_one(runpod):
    code, out = _run("status", "sdxl-4090")
    assert code == 0 and "no pod named lorastack-sdxl-4090" in out and "make train STACK=sdxl-4090" in out


def test_a_missing_key_is_named_with_where_to_set_it(no_credentials, capsys):
    code, _ = _run("status", "sdxl-4090")
    err = capsys.readouterr().err
    assert code == 2
    assert "RUNPOD_API_KEY is not set: export RUNPOD_API_KEY" in err and "pulumi config set --secret runpodApiKey" in err


def test_an_api_error_never_prints_the_key(no_credentials, monkeypatch, capsys):
    api = RunpodApi(api_key="the-real-key-0000")
    with serve(api) as base_url:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", base_url)
        monkeypatch.setenv("RUNPOD_API_KEY", "a-wrong-key-9876")
        code, out = _run("status", "sdxl-4090")
    err = capsys.readouterr().err
    assert code == 2 and "401" in err
    assert "a-wrong-key-9876" not in err + out


def test_logs_follow_the_pod_until_it_stops(runpod):
    api, client = runpod
    pod_id = _start_pod(client, "sdxl-4090")
    api.append_log(pod_id, "step 1/1500 loss 0.2 lr 1.0e-04 cost $0.00 (est. $0.00)")

    def later() -> None:
        time.sleep(0.3)
        api.append_log(pod_id, "succeeded: LoRA exported (step 1500/1500, 28m01s, cost $0.28)")
        api.set_status(pod_id, "EXITED")

    threading.Thread(target=later, daemon=True).start()
    code, out = _run("logs", "sdxl-4090")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"-- following pod {pod_id}")
    assert "step 1/1500 loss 0.2 lr 1.0e-04 cost $0.00 (est. $0.00)" in lines
    assert lines.index("succeeded: LoRA exported (step 1500/1500, 28m01s, cost $0.28)") < len(lines) - 1
    assert lines[-1] == f"-- pod {pod_id} is EXITED: the log has ended"


def test_ctrl_c_leaves_logs_cleanly(runpod, monkeypatch):
    _, client = runpod
    _start_pod(client, "sdxl-4090")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "follow_logs", interrupted)
    assert _run("logs", "sdxl-4090")[0] == 0


# --- infra.ops fetch ---------------------------------------------------------------------------------------------


def test_fetch_copies_the_lora_from_a_volume_mounted_here(no_credentials, tmp_path, monkeypatch):
    config = load_stack("sdxl-4090")
    paths = RunPaths(tmp_path / "volume", run_id("sdxl-4090", config.train))
    paths.lora.mkdir(parents=True)
    (paths.lora / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    paths.done.write_text("")
    monkeypatch.setenv("LORASTACK_WORKSPACE", str(tmp_path / "volume"))
    monkeypatch.setattr(project_paths, "OUTPUTS_DIR", tmp_path / "outputs")
    code, out = _run("fetch", "sdxl-4090")
    assert code == 0, out
    assert (tmp_path / "outputs" / "sdxl-4090" / "pytorch_lora_weights.safetensors").read_bytes() == b"weights"


def test_fetch_downloads_from_the_hub_when_the_stack_names_a_repo(no_credentials, tmp_path, monkeypatch):
    import huggingface_hub

    config = load_stack("sdxl-4090")
    hub_config = config.model_copy(update={"train": config.train.model_copy(update={"hf_repo": "acme/sdxl-style"})})
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        Path(kwargs["local_dir"]).mkdir(parents=True)
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(project_paths, "OUTPUTS_DIR", tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    out = io.StringIO()
    assert ops.run_command("fetch", "sdxl-4090", hub_config, out) == 0
    assert calls == [{"repo_id": "acme/sdxl-style", "repo_type": "model", "local_dir": tmp_path / "sdxl-4090",
                      "token": "hf_secret_token"}]
    assert "hf_secret_token" not in out.getvalue()


def test_fetch_without_s3_keys_prints_the_exact_steps(runpod, tmp_path, monkeypatch):
    _, client = runpod
    pod_id = _start_pod(client, "sdxl-4090")
    volume_id = client.get_pod(pod_id)["mounts"]["network"][0]["volumeId"]
    monkeypatch.setattr(project_paths, "OUTPUTS_DIR", tmp_path)
    code, out = _run("fetch", "sdxl-4090")
    lora_dir = f"runs/{run_id('sdxl-4090', load_stack('sdxl-4090').train)}/lora"
    assert code == 2
    assert f"{runs.S3_ACCESS_KEY_ENV} and {runs.S3_SECRET_KEY_ENV} are not set" in out
    assert (f"aws s3 cp --recursive --region EU-RO-1 --endpoint-url https://s3api-eu-ro-1.runpod.io "
            f"s3://{volume_id}/{lora_dir}/ outputs/sdxl-4090/") in out


def test_fetch_through_the_s3_api_writes_every_file_under_the_lora_folder(tmp_path):
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    s3 = boto3.client("s3", aws_access_key_id="user_x", aws_secret_access_key="rps_y", region_name="EU-RO-1",
                      endpoint_url="https://s3api-eu-ro-1.runpod.io")
    stub = Stubber(s3)
    prefix = "runs/sdxl-4090-abc/lora/"
    stub.add_response("list_objects_v2", {"Contents": [
        {"Key": prefix, "Size": 0},
        {"Key": prefix + "pytorch_lora_weights.safetensors", "Size": 7},
        {"Key": prefix + "kohya/style.safetensors", "Size": 5},
    ], "IsTruncated": False}, {"Bucket": "vol123", "Prefix": prefix})
    for key, data in ((prefix + "pytorch_lora_weights.safetensors", b"weights"), (prefix + "kohya/style.safetensors", b"kohya")):
        stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(data), len(data))}, {"Bucket": "vol123", "Key": key})
    environ = {runs.S3_ACCESS_KEY_ENV: "user_x", runs.S3_SECRET_KEY_ENV: "rps_y"}
    made = []

    def make_client(service, **kwargs):
        made.append(kwargs)
        return s3

    with stub:
        written = runs.fetch_from_s3("vol123", "EU-RO-1", prefix, tmp_path, environ, make_client=make_client)
    stub.assert_no_pending_responses()
    assert sorted(path.relative_to(tmp_path).as_posix() for path in written) == [
        "kohya/style.safetensors", "pytorch_lora_weights.safetensors"]
    assert (tmp_path / "kohya" / "style.safetensors").read_bytes() == b"kohya"
    assert made[0]["endpoint_url"] == "https://s3api-eu-ro-1.runpod.io" and made[0]["region_name"] == "EU-RO-1"


def test_progress_records_parse_and_other_lines_do_not():
    line = progress_record("running", 120, 1000, loss=0.1234, lr=1e-4, seconds_per_step=0.85, eta_seconds=765.0,
                           cost_usd=0.12, estimated_cost_usd=0.30)
    parsed = progress.parse_progress_line(line)
    assert (parsed.state, parsed.step, parsed.total, parsed.loss, parsed.seconds_per_step, parsed.eta,
            parsed.cost_usd, parsed.source) == ("running", 120, 1000, 0.1234, 0.85, "12m45s", 0.12, "pod log")
    # the human line beside it, other log lines and other JSON are not progress
    assert progress.parse_progress_line("step 120/1000 loss 0.1234 lr 1.0e-04 0.85 s/step ETA 12m45s cost $0.12") is None
    assert progress.parse_progress_line("samples at step 500: 2 images in /workspace/runs/x/samples") is None
    assert progress.parse_progress_line('{"level": "info", "step": 3, "total": 9}') is None
    assert progress.parse_progress_line(line[:-5]) is None  # a line cut off mid-record
    assert progress.parse_progress_line("Model loaded.") is None
