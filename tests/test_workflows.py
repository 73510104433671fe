"""The GitHub Actions workflows: valid YAML, GitHub's workflow schema (SchemaStore's, through check-jsonschema),
a structural check of expressions, and what a team relies on: previews for stack changes, `pulumi up` only from main,
secrets only through `${{ secrets.* }}`, every action pinned to a release."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra import affected

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS_DIR = ROOT / ".github" / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS_DIR.glob("*.yml"))
ALLOWED_SECRETS = {
    "RUNPOD_API_KEY", "REPLICATE_API_TOKEN", "PULUMI_ACCESS_TOKEN", "PULUMI_CONFIG_PASSPHRASE", "GITHUB_TOKEN",
    # the state bucket's credentials, for s3:// gs:// azblob:// backends
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GOOGLE_CREDENTIALS", "AZURE_STORAGE_KEY",
}
CREDENTIAL_ENV = ALLOWED_SECRETS - {"GITHUB_TOKEN"}
CONTEXTS = {"github", "env", "vars", "secrets", "matrix", "needs", "steps", "strategy", "inputs", "runner", "job"}
WORKFLOW_KEYS = {"name", "run-name", "on", "permissions", "env", "defaults", "concurrency", "jobs"}
JOB_KEYS = {"name", "needs", "if", "runs-on", "environment", "permissions", "concurrency", "outputs", "env",
            "defaults", "timeout-minutes", "strategy", "continue-on-error", "container", "services", "steps"}
STEP_KEYS = {"id", "if", "name", "uses", "run", "with", "env", "shell", "working-directory", "continue-on-error",
             "timeout-minutes"}
PINNED_ACTION = re.compile(r"^[\w.-]+/[\w./-]+@(v\d+\.\d+\.\d+|[0-9a-f]{40})$")
EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)
LITERAL_TOKEN = re.compile(r"\b(r8_[A-Za-z0-9]{20,}|hf_[A-Za-z0-9]{20,}|rpa_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
                           r"|AKIA[0-9A-Z]{16}|pul-[0-9a-f]{20,})")


def load(path: Path) -> dict:
    document = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the bare key `on` as the boolean true
    if True in document:
        document["on"] = document.pop(True)
    return document


WORKFLOWS = {path.stem: load(path) for path in WORKFLOW_FILES}


def strings(node: object, path: str = "") -> list[tuple[str, str]]:
    """Every string in a document with its location, keys included."""
    if isinstance(node, dict):
        return [found for key, value in node.items() for found in [(path, str(key)), *strings(value, f"{path}.{key}")]]
    if isinstance(node, list):
        return [found for index, item in enumerate(node) for found in strings(item, f"{path}[{index}]")]
    return [(path, node)] if isinstance(node, str) else []


def steps(workflow: dict) -> list[tuple[str, dict]]:
    return [(job_id, step) for job_id, job in workflow["jobs"].items() for step in job.get("steps", [])]


def pulumi_steps(workflow: dict) -> list[dict]:
    return [step for _, step in steps(workflow) if str(step.get("uses", "")).startswith("pulumi/actions@")]


def test_the_four_workflows_are_there():
    assert set(WORKFLOWS) == {"preview", "up", "image", "reap"}


# --- schema -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_structure(name):
    workflow = WORKFLOWS[name]
    assert set(workflow) <= WORKFLOW_KEYS, f"{name}: unknown top-level keys {set(workflow) - WORKFLOW_KEYS}"
    assert workflow["on"] and workflow["jobs"]
    for job_id, job in workflow["jobs"].items():
        assert set(job) <= JOB_KEYS, f"{name}.{job_id}: unknown keys {set(job) - JOB_KEYS}"
        assert job.get("runs-on") and job.get("steps"), f"{name}.{job_id}: runs-on and steps are required"
        needs = [job["needs"]] if isinstance(job.get("needs"), str) else job.get("needs", [])
        assert set(needs) <= set(workflow["jobs"]), f"{name}.{job_id}: needs an unknown job"
        step_ids = {step["id"] for step in job["steps"] if "id" in step}
        for step in job["steps"]:
            assert set(step) <= STEP_KEYS, f"{name}.{job_id}: unknown step keys {set(step) - STEP_KEYS}"
            assert ("uses" in step) != ("run" in step), f"{name}.{job_id}: a step has exactly one of uses/run"
        # `if:` holds an expression with or without ${{ }}; elsewhere only ${{ }} is evaluated
        conditions = [(".if", job["if"])] if "if" in job else []
        conditions += [(f".steps[{index}].if", step["if"]) for index, step in enumerate(job["steps"]) if "if" in step]
        for where, text in strings(job) + conditions:
            found = EXPRESSION.findall(text)
            for expression in found or ([text] if (where, text) in conditions else []):
                for context, member in re.findall(r"(?<![\w.'\"])([a-z]+)\.([\w-]+)", expression):
                    if context not in CONTEXTS:
                        continue  # e.g. a file name inside a string literal
                    if context == "steps":
                        assert member in step_ids, f"{name}.{job_id}{where}: steps.{member} is no step id of this job"
                    if context == "needs":
                        assert member in needs, f"{name}.{job_id}{where}: needs.{member} is not in needs"
                bare = re.findall(r"(?<![\w.'\"-])([a-z]+)\.", expression)
                unknown = {word for word in bare if word not in CONTEXTS}
                assert not unknown, f"{name}.{job_id}{where}: unknown contexts {unknown} in ${{{{{expression}}}}}"


def test_workflows_match_githubs_schema():
    # SchemaStore's GitHub workflow schema, vendored by check-jsonschema: runs offline, unlike actionlint's binary.
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
         *map(str, WORKFLOW_FILES)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_catches_a_typo(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW_FILES[0].read_text().replace("runs-on:", "run-on:", 1))
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(broken)],
        capture_output=True, text=True,
    )
    assert result.returncode != 0


# --- what a user notices ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_every_action_is_pinned_to_a_release(name):
    for job_id, step in steps(WORKFLOWS[name]):
        if "uses" in step:
            assert PINNED_ACTION.match(step["uses"]), f"{name}.{job_id}: {step['uses']} is not pinned to vX.Y.Z or a SHA"


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_secrets_come_only_from_repository_secrets(name):
    workflow = WORKFLOWS[name]
    for where, text in strings(workflow):
        assert not LITERAL_TOKEN.search(text), f"{name}{where}: a credential written into the workflow"
        referenced = set(re.findall(r"secrets\.(\w+)", text))
        assert referenced <= ALLOWED_SECRETS, f"{name}{where}: unexpected secrets {referenced - ALLOWED_SECRETS}"
    for job_id, step in steps(workflow):
        # in a script a secret would be pasted into the shell text; through env it stays a masked variable
        assert "secrets." not in step.get("run", ""), f"{name}.{job_id}: a secret interpolated into a run script"
    for where, env in [(f"{job_id}.env", job.get("env", {})) for job_id, job in workflow["jobs"].items()] + [
            (f"{job_id}.step.env", step.get("env", {})) for job_id, step in steps(workflow)]:
        for variable, value in env.items():
            if variable in CREDENTIAL_ENV:
                expected = f"${{{{ secrets.{variable} }}}}"
                assert value == expected, f"{name}.{where}.{variable} must be {expected}"


def test_pull_requests_preview_every_affected_stack_with_policies_and_a_cost_comment():
    preview = WORKFLOWS["preview"]
    assert set(preview["on"]) == {"pull_request"}
    paths = preview["on"]["pull_request"]["paths"]
    assert "stacks/**" in paths
    runs = [step.get("run", "") for _, step in steps(preview)]
    assert "make setup" in runs and "make test" in runs and "make check" in runs
    assert any("python -m infra.affected" in run and "--json" in run for run in runs)
    assert any("python -m infra.cost --markdown" in run for run in runs)
    [pulumi] = pulumi_steps(preview)
    assert pulumi["with"]["command"] == "preview"
    assert pulumi["with"]["comment-on-pr"] is True and pulumi["with"]["policyPacks"] == "policy/"
    assert "matrix.stack" in pulumi["with"]["stack-name"]


@pytest.mark.parametrize("name", ["preview", "up"])
def test_the_triggers_match_what_infra_affected_counts_as_affecting(name):
    on = WORKFLOWS[name]["on"]
    paths = set((on.get("pull_request") or on.get("push"))["paths"])
    expected = {"stacks/**", *(prefix + "**" for prefix in affected.SHARED_PREFIXES), *affected.SHARED_FILES}
    assert paths == expected


def test_pulumi_up_runs_only_on_pushes_to_main_one_update_per_stack_at_a_time():
    up = WORKFLOWS["up"]
    assert set(up["on"]) == {"push"} and up["on"]["push"]["branches"] == ["main"]
    [pulumi] = pulumi_steps(up)
    assert pulumi["with"]["command"] == "up" and pulumi["with"]["policyPacks"] == "policy/"
    job = next(job for job in up["jobs"].values() if pulumi in job["steps"])
    assert job["environment"], "an up needs the environment's protection rules"
    assert "matrix.stack" in job["concurrency"]["group"] and job["concurrency"]["cancel-in-progress"] is False
    for name, workflow in WORKFLOWS.items():
        if name != "up":
            assert all(step["with"].get("command") != "up" for step in pulumi_steps(workflow)), name


def test_state_lives_in_the_backend_named_by_the_repository_variable():
    for name, workflow in WORKFLOWS.items():
        for step in pulumi_steps(workflow):
            if "command" in step["with"]:
                assert step["with"]["cloud-url"] == "${{ vars.PULUMI_BACKEND_URL }}", name


def test_a_version_tag_builds_the_image_only_when_it_matches_training_version():
    image = WORKFLOWS["image"]
    assert image["on"] == {"push": {"tags": ["v*.*.*"]}}
    job_steps = [step for _, step in steps(image)]
    check = next(step for step in job_steps if "training/version.py" in step.get("run", ""))
    build = next(step for step in job_steps if str(step.get("uses", "")).startswith("docker/build-push-action@"))
    assert job_steps.index(check) < job_steps.index(build) and "exit 1" in check["run"]
    assert build["with"]["push"] is True and "ghcr.io/" in str(image)
    assert any("steps.build.outputs.digest" in str(step.get("env", {})) and "GITHUB_STEP_SUMMARY" in step.get("run", "")
               for step in job_steps)


@pytest.mark.parametrize("tag, version, passes", [("v0.1.0", "0.1.0", True), ("v0.2.0", "0.1.0", False)])
def test_the_version_check_script_compares_tag_and_version(tmp_path, tag, version, passes):
    check = next(step for _, step in steps(WORKFLOWS["image"]) if "training/version.py" in step.get("run", ""))
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "version.py").write_text(f'__version__ = "{version}"\n')
    github_env = tmp_path / "github_env"
    result = subprocess.run(["bash", "-e", "-c", check["run"]], cwd=tmp_path, capture_output=True, text=True,
                            env={"TAG": tag, "GITHUB_ENV": str(github_env), "PATH": "/usr/bin:/bin"})
    assert (result.returncode == 0) is passes, result.stdout + result.stderr
    if passes:
        assert github_env.read_text() == f"VERSION={version}\n"
    else:
        assert f"tag {tag} does not match __version__ = {version}" in result.stdout


def test_the_reaper_runs_every_half_hour_and_on_demand():
    reap = WORKFLOWS["reap"]
    assert reap["on"]["schedule"] == [{"cron": "*/30 * * * *"}] and "workflow_dispatch" in reap["on"]
    runs = [step.get("run", "") for _, step in steps(reap)]
    assert runs.index("make setup") < runs.index("make reap")
