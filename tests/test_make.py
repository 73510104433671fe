"""The Makefile and `infra.confirm` as a user meets them: `make train` / `make destroy` show the change and ask like
`pulumi up` (YES=1 or CI=true go ahead, no terminal means no change), a pod replacement and a volume deletion are
called out first, no empty PULUMI_CONFIG_PASSPHRASE reaches Pulumi, usage errors come before any Python starts, and
`--help` loads no deep-learning or Pulumi package.

The Pulumi CLI is a fake: a script that records each call (argv and whether PULUMI_CONFIG_PASSPHRASE was set) and
prints, for the preview, JSON shaped like the real CLI's: `pulumi preview --json` prints one document with `steps`
(pkg/display/json.go's previewDigest: op, urn, oldState, newState, diffReasons, replaceReasons, detailedDiff), while
`pulumi destroy --json` streams engine events, one a line (`resourcePreEvent.metadata`: op, urn, type, old, new, keys).
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from infra import confirm

ROOT = Path(__file__).resolve().parent.parent
STACK = "sdxl-4090"
PROVIDER = "urn:pulumi:sdxl-4090::lorastack::pulumi:providers:pulumi-python::default::04da6b54-80e4-46f7-96ec-b56ff0331ba9"


def urn(type_: str, name: str) -> str:
    return f"urn:pulumi:{STACK}::lorastack::lorastack:runpod:Training${type_}::{name}"


POD = urn("pulumi-python:dynamic/runpod:Pod", "lorastack-sdxl-4090")
VOLUME = urn("pulumi-python:dynamic/runpod:NetworkVolume", "lorastack-sdxl-4090-volume")
STACK_URN = f"urn:pulumi:{STACK}::lorastack::pulumi:pulumi:Stack::lorastack-{STACK}"


def state(urn_: str, inputs: dict, retain: bool = False) -> dict:
    type_ = urn_.split("::")[2].rsplit("$", 1)[-1]
    return {"urn": urn_, "custom": True, "type": type_, "inputs": inputs, "outputs": inputs,
            **({"retainOnDelete": True} if retain else {})}


REPLACE_POD_PREVIEW = {
    "config": {"lorastack:provider": "runpod", "lorastack:runpodApiKey": "[secret]"},
    "steps": [
        {"op": "same", "urn": STACK_URN, "detailedDiff": None},
        {"op": "replace", "urn": POD, "provider": PROVIDER, "diffReasons": ["gpuTypeId"],
         "replaceReasons": ["gpuTypeId"], "detailedDiff": None,
         "oldState": state(POD, {"gpuTypeId": "NVIDIA GeForce RTX 3090"}),
         "newState": state(POD, {"gpuTypeId": "NVIDIA GeForce RTX 4090"})},
        {"op": "same", "urn": VOLUME, "detailedDiff": None},
    ],
    "changeSummary": {"replace": 1, "same": 2},
}
NO_CHANGE_PREVIEW = {"steps": [{"op": "same", "urn": STACK_URN, "detailedDiff": None}], "changeSummary": {"same": 1}}


def destroy_events(keep_volume: bool) -> str:
    events = [{"sequence": 0, "timestamp": 1, "preludeEvent": {"config": {}}}]
    for index, (urn_, inputs) in enumerate([(POD, {"gpuTypeId": "NVIDIA GeForce RTX 4090"}),
                                            (VOLUME, {"keepOnDestroy": keep_volume, "sizeGb": 100})]):
        old = state(urn_, inputs, retain=keep_volume and urn_ == VOLUME)
        events.append({"sequence": index + 1, "timestamp": 2, "resourcePreEvent": {"metadata": {
            "op": "delete", "urn": urn_, "type": old["type"], "provider": PROVIDER, "old": old, "new": None,
            "detailedDiff": None}}})
    events.append({"sequence": 9, "timestamp": 3, "summaryEvent": {"resourceChanges": {"delete": 2}}})
    return "\n".join(json.dumps(event) for event in events)


def fake_pulumi(directory: Path, preview_output: str) -> tuple[Path, Path]:
    calls = directory / "calls.jsonl"
    (directory / "preview.out").write_text(preview_output)
    script = directory / "pulumi"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
with open({str(calls)!r}, "a") as log:
    log.write(json.dumps({{"args": args, "passphrase_set": "PULUMI_CONFIG_PASSPHRASE" in os.environ}}) + "\\n")
if "--json" in args:
    sys.stdout.write(open({str(directory / "preview.out")!r}).read())
else:
    print("Resources: changed")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, calls


def calls_of(calls: Path) -> list[dict]:
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def make(*args: str, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    base = {key: value for key, value in os.environ.items() if key not in ("CI", "YES", "PULUMI_CONFIG_PASSPHRASE")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, env=base | (env or {}), timeout=120)


def test_make_train_shows_the_change_and_changes_nothing_without_an_answer(tmp_path):
    pulumi, calls = fake_pulumi(tmp_path, json.dumps(REPLACE_POD_PREVIEW))
    done = make("train", f"STACK={STACK}", f"PULUMI={pulumi}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "+- replace  pulumi-python:dynamic/runpod:Pod lorastack-sdxl-4090  [gpuTypeId]" in done.stdout
    assert "WARNING: the pod lorastack-sdxl-4090 will be REPLACED (gpuTypeId changed)" in done.stdout
    assert "no terminal to ask on: nothing was changed" in done.stdout and "YES=1" in done.stdout
    assert [call["args"][0] for call in calls_of(calls)] == ["preview"]
    assert calls_of(calls)[0]["args"] == ["preview", "--stack", STACK, "--json", "--diff"]


@pytest.mark.parametrize("consent", [["YES=1"], []], ids=["YES=1", "CI=true"])
def test_yes_or_ci_goes_ahead_without_the_question(tmp_path, consent):
    pulumi, calls = fake_pulumi(tmp_path, json.dumps(REPLACE_POD_PREVIEW))
    done = make("train", f"STACK={STACK}", f"PULUMI={pulumi}", *consent, env={} if consent else {"CI": "true"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING: the pod lorastack-sdxl-4090 will be REPLACED" in done.stdout
    recorded = calls_of(calls)
    assert [call["args"] for call in recorded] == [
        ["preview", "--stack", STACK, "--json", "--diff"], ["up", "--stack", STACK, "--yes", "--skip-preview"]]
    assert not any(call["passphrase_set"] for call in recorded)  # an empty passphrase is a passphrase to Pulumi


def test_make_destroy_calls_out_the_volume_and_its_checkpoints(tmp_path):
    pulumi, calls = fake_pulumi(tmp_path, destroy_events(keep_volume=False))
    done = make("destroy", f"STACK={STACK}", f"PULUMI={pulumi}", "YES=1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING: the network volume lorastack-sdxl-4090-volume will be DELETED" in done.stdout
    assert "checkpoints" in done.stdout
    assert [call["args"] for call in calls_of(calls)] == [
        ["destroy", "--stack", STACK, "--preview-only", "--json"], ["destroy", "--stack", STACK, "--yes"]]


def test_a_kept_volume_is_no_warning(tmp_path):
    steps = confirm.parse_steps(destroy_events(keep_volume=True))
    assert [(step.type, step.op) for step in steps] == [(confirm.POD_TYPE, "delete"), (confirm.VOLUME_TYPE, "delete")]
    assert confirm.warnings(steps) == []
    assert "(retained: forgotten, not deleted)" in confirm.render(steps)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "applied"), [("y\n", True), ("\n", False), ("no\n", False)])
def test_on_a_terminal_it_asks_and_only_yes_applies(tmp_path, answer, applied):
    pulumi, calls = fake_pulumi(tmp_path, json.dumps(REPLACE_POD_PREVIEW))
    out = io.StringIO()
    code = confirm.run("up", STACK, False, {"PULUMI": str(pulumi)}, Terminal(answer), out)
    assert "Do you want to perform this update? [y/N] " in out.getvalue()
    assert code == (0 if applied else 1)
    assert ("up" in [call["args"][0] for call in calls_of(calls)]) is applied


def test_no_changes_asks_nothing(tmp_path):
    pulumi, calls = fake_pulumi(tmp_path, json.dumps(NO_CHANGE_PREVIEW))
    out = io.StringIO()
    assert confirm.run("up", STACK, False, {"PULUMI": str(pulumi)}, Terminal(""), out) == 0
    assert "no changes" in out.getvalue() and len(calls_of(calls)) == 1


def test_a_failed_preview_changes_nothing(tmp_path):
    script = tmp_path / "pulumi"
    script.write_text(f"#!{sys.executable}\nimport sys\nprint('error: no stack named sdxl-4090', file=sys.stderr)\n"
                      "sys.exit(255)\n")
    script.chmod(0o755)
    out = io.StringIO()
    assert confirm.run("up", STACK, True, {"PULUMI": str(script)}, Terminal(""), out) == 255
    assert "error: no stack named sdxl-4090" in out.getvalue() and "nothing was changed" in out.getvalue()


@pytest.mark.parametrize("target", ["preview", "train", "destroy", "status", "logs", "fetch"])
def test_a_missing_stack_is_a_usage_error_before_any_python_starts(target):
    done = make(target, "PY=/no/python/here", "PULUMI=/bin/true")
    assert done.returncode == 2
    assert f"name a stack: make {target} STACK=sdxl-4090" in done.stderr


def test_train_local_usage():
    done = make("train-local", "PY=/no/python/here", "DATA=images/")
    assert done.returncode == 2 and "usage: make train-local DATA=folder FAMILY=" in done.stderr


HELP_MODULES = ["training.tiny", "training.local", "infra.cost", "infra.check", "infra.confirm", "infra.ops",
                "infra.reaper"]


@pytest.mark.parametrize("module", HELP_MODULES)
def test_help_loads_no_deep_learning_or_pulumi_package(module):
    code = (
        "import json, runpy, sys\n"
        f"sys.argv = [{module!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
        "except SystemExit as done:\n"
        "    assert done.code in (0, None), done.code\n"
        "print(json.dumps(sorted(m for m in ('torch', 'diffusers', 'transformers', 'pulumi') if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    *usage, loaded = done.stdout.strip().splitlines()
    assert any(line.startswith("usage:") for line in usage)
    assert json.loads(loaded) == []


def test_the_warned_types_are_the_ones_our_resources_have():
    from infra.runpod_backend.pod import Pod
    from infra.runpod_backend.volume import NetworkVolume

    assert f"pulumi-python:{Pod._resource_type_name}" == confirm.POD_TYPE
    assert f"pulumi-python:{NetworkVolume._resource_type_name}" == confirm.VOLUME_TYPE
