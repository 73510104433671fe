"""Credentials in one place: `make status|logs|fetch|reap` read the stack's own secret config through the Pulumi CLI
when the CLI and the stack are there, the environment otherwise, and say which, never the value. The Pulumi CLI is a
fake here: a script that records its arguments and answers `pulumi config get` as the real one does (the plain
value on stdout, exit 0; an error on stderr, exit 255)."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from emulator.runpod import RunpodApi
from emulator.server import serve
from infra import credentials, ops, reaper, stack_files
from infra.runpod_backend import runs

ROOT = Path(__file__).resolve().parent.parent
KEY = "rp-from-stack-config-7d2e"
SECRET_ENTRY = "  lorastack:runpodApiKey:\n    secure: v1:AAAABBBBCCCC\n"


def fake_pulumi(directory: Path, answer: str | None, calls: Path) -> Path:
    """A `pulumi` that logs each call's argv (one JSON list a line) and prints `answer` for `config get`."""
    script = directory / "pulumi"
    body = (f"print({answer!r}); sys.exit(0)" if answer is not None
            else "print('error: passphrase must be set with PULUMI_CONFIG_PASSPHRASE', file=sys.stderr); sys.exit(255)")
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n{body}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.fixture()
def stacks_dir(tmp_path, monkeypatch):
    """A stacks/ folder whose sdxl-4090 holds an encrypted runpodApiKey, as `pulumi config set --secret` writes it."""
    folder = tmp_path / "stacks"
    folder.mkdir()
    text = (ROOT / "stacks" / "Pulumi.sdxl-4090.yaml").read_text()
    (folder / "Pulumi.sdxl-4090.yaml").write_text(text.rstrip("\n") + "\n" + SECRET_ENTRY)
    (folder / "Pulumi.plain.yaml").write_text(text)  # no secret in this one
    monkeypatch.setattr(stack_files, "STACKS_DIR", folder)
    monkeypatch.setattr(reaper, "STACKS_DIR", folder)
    return folder


@pytest.fixture()
def environ(tmp_path):
    return {"PATH": os.environ["PATH"]}


def test_the_stacks_secret_config_comes_first_and_its_source_is_named(stacks_dir, environ, tmp_path):
    calls = tmp_path / "calls"
    environ[credentials.PULUMI_ENV] = str(fake_pulumi(tmp_path, KEY, calls))
    environ["RUNPOD_API_KEY"] = "rp-from-the-environment"
    report = io.StringIO()
    credentials.use_stack_credentials(("runpodApiKey",), (), ["sdxl-4090"], environ, report)
    assert environ["RUNPOD_API_KEY"] == KEY
    assert json.loads(calls.read_text()) == ["config", "get", "lorastack:runpodApiKey", "--stack", "sdxl-4090"]
    assert report.getvalue() == "runpodApiKey: the sdxl-4090 stack's secret config (pulumi config get runpodApiKey)\n"


def test_the_environment_when_pulumi_cannot_read_the_stack(stacks_dir, environ, tmp_path):
    environ[credentials.PULUMI_ENV] = str(fake_pulumi(tmp_path, None, tmp_path / "calls"))
    environ["RUNPOD_API_KEY"] = "rp-from-the-environment"
    found = credentials.find_credential("runpodApiKey", ["sdxl-4090"], environ)
    assert found.value == "rp-from-the-environment"
    assert found.source.startswith("the environment ($RUNPOD_API_KEY); `pulumi config get runpodApiKey --stack sdxl-4090` "
                                   "failed: error: passphrase must be set")
    assert "rp-from" not in repr(found)


def test_the_environment_without_a_pulumi_cli(stacks_dir, environ, tmp_path):
    environ[credentials.PULUMI_ENV] = str(tmp_path / "no-such-pulumi")
    environ["RUNPOD_API_KEY"] = "rp-env"
    found = credentials.find_credential("runpodApiKey", ["sdxl-4090"], environ)
    assert found.value == "rp-env" and "no Pulumi CLI" in found.source


def test_a_stack_without_the_secret_never_calls_pulumi(stacks_dir, environ, tmp_path):
    calls = tmp_path / "calls"
    environ[credentials.PULUMI_ENV] = str(fake_pulumi(tmp_path, KEY, calls))
    found = credentials.find_credential("runpodApiKey", ["plain"], environ)
    assert found.value is None and not calls.exists()
    assert found.source == ("not set (`pulumi config set --secret runpodApiKey <value> --stack <stack>`, "
                            "or export RUNPOD_API_KEY=<value>)")


def test_make_status_uses_the_stacks_key_and_never_prints_it(stacks_dir, tmp_path, monkeypatch, capsys):
    api = RunpodApi(api_key=KEY)
    with serve(api) as base_url:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", base_url)
        monkeypatch.setenv("RUNPOD_API_KEY", "")  # restored (removed) after the test: status writes it
        monkeypatch.setenv(credentials.PULUMI_ENV, str(fake_pulumi(tmp_path, KEY, tmp_path / "calls")))
        monkeypatch.setattr(runs, "STATUS_READ_TIMEOUT_S", 0.5)
        out = io.StringIO()
        assert ops.main(["status", "sdxl-4090"], out=out) == 0
    err = capsys.readouterr().err
    assert "no pod named lorastack-sdxl-4090" in out.getvalue()  # the emulator accepted the stack's key
    assert "runpodApiKey: the sdxl-4090 stack's secret config" in err
    assert KEY not in err + out.getvalue()


def test_make_reap_tries_the_stacks_that_hold_the_key(stacks_dir, tmp_path, monkeypatch, capsys):
    api = RunpodApi(api_key=KEY)
    with serve(api) as base_url:
        monkeypatch.setenv("RUNPOD_API_BASE_URL", base_url)
        monkeypatch.setenv("RUNPOD_API_KEY", "")
        monkeypatch.setenv(credentials.PULUMI_ENV, str(fake_pulumi(tmp_path, KEY, tmp_path / "calls")))
        out = io.StringIO()
        assert reaper.main(["--dry-run"], out=out) == 0
    assert out.getvalue().strip() == "no lorastack pods"
    assert "runpodApiKey: the sdxl-4090 stack's secret config" in capsys.readouterr().err


def test_fetch_names_the_hub_token_only_when_it_has_one(stacks_dir, environ, tmp_path):
    environ[credentials.PULUMI_ENV] = str(tmp_path / "no-such-pulumi")
    environ["RUNPOD_API_KEY"] = "rp-env"
    report = io.StringIO()
    credentials.use_stack_credentials(("runpodApiKey",), ("hfToken",), ["plain"], environ, report)
    assert report.getvalue() == "runpodApiKey: the environment ($RUNPOD_API_KEY)\n"
    environ["HF_TOKEN"] = "hf_env_token"
    report = io.StringIO()
    credentials.use_stack_credentials(("runpodApiKey",), ("hfToken",), ["plain"], environ, report)
    assert report.getvalue().splitlines()[1] == "hfToken: the environment ($HF_TOKEN)"
    assert "hf_env_token" not in report.getvalue()


@pytest.mark.parametrize(("stack", "named", "not_named"), [
    ("sdxl-lambda-h100", "lambdaApiKey", "runpodApiKey"),
    ("sdxl-vast-4090", "vastApiKey", "runpodApiKey"),
    ("sdxl-4090", "runpodApiKey", "lambdaApiKey"),
])
def test_make_status_names_only_the_credential_its_backend_reads(stack, named, not_named, tmp_path, monkeypatch,
                                                                   capsys):
    for env_name in credentials.SECRETS.values():
        monkeypatch.delenv(env_name, raising=False)
    monkeypatch.setenv(credentials.PULUMI_ENV, str(tmp_path / "no-such-pulumi"))
    assert ops.main(["status", stack], out=io.StringIO()) == 2  # nothing to ask the API with
    err = capsys.readouterr().err
    assert f"{named}: not set (`pulumi config set --secret {named}" in err
    assert not_named not in err


def test_make_reap_skips_a_backend_without_its_credential_and_reaps_the_others(stacks_dir, tmp_path, monkeypatch,
                                                                               capsys):
    for env_name in credentials.SECRETS.values():
        monkeypatch.delenv(env_name, raising=False)
    monkeypatch.setenv(credentials.PULUMI_ENV, str(tmp_path / "no-such-pulumi"))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")  # no local engine either
    out = io.StringIO()
    assert reaper.main(["--dry-run"], out=out) == 0
    err = capsys.readouterr().err
    assert "RunPod: RUNPOD_API_KEY is not set, so its pods were not checked" in err
    assert out.getvalue().strip() == "no lorastack pods"
