"""Job: one Hugging Face Job running our trainer image, as a Pulumi dynamic resource (through `HfJobs`).

A job cannot be changed once created (the API has no update but its labels), so every change of image, command,
environment, secrets, flavor or timeout replaces it: the old job is canceled first (never two trainers writing
one checkpoint repo), then the new one starts and resumes from the repo's newest checkpoint.

Retry-safe create: `run_job` POSTs once and the create endpoint has had intermittent 500s, so a POST that got no
answer (or a 5xx) may still have created the job. Before every try the provider lists the namespace's jobs by
our labels (stack and run id) and adopts a live one instead of creating a second.

A job ends by itself when the trainer exits (COMPLETED or ERROR); `read` drops a job that ended without
finishing (ERROR, CANCELED, DELETED) from the state, so `pulumi up --refresh` starts a new job, which resumes.

Secrets (HF_TOKEN, WANDB_API_KEY) go in the job's `secrets`, which the platform stores encrypted; the resource
marks them secret in the state.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, ReadResult, UpdateResult
from pulumi.dynamic.dynamic import PROVIDER_KEY

from contract.spec import ENV_MANAGED
from infra.config import is_pinned
from infra.dynamic import CredentialedProvider, is_unknown, keyed_diff, whole_numbers
from infra.hfjobs_backend import catalog
from infra.hfjobs_backend.client import LABEL_RUN, LABEL_STACK, TERMINAL_STAGES, HfJobs, is_not_found, is_transient

JOB_REPLACE_KEYS = ("namespace", "image", "command", "environment", "secrets", "flavor", "timeoutSeconds", "labels")
JOB_INTEGER_KEYS = ("timeoutSeconds",)
UNFINISHED_STAGES = ("ERROR", "CANCELED", "DELETED")  # ended without the run: a new job resumes it
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class JobProvider(CredentialedProvider):
    """Inputs: namespace (None: the token's user), image, command, environment, secrets, flavor, timeoutSeconds,
    labels. Outputs add jobId, stage, owner, url, createdAt (as of the last create or refresh)."""

    credential = "hfToken"

    def __init__(self, retries: int = 6, backoff: float = 0.5, landing_s: float = 10.0, cancel_wait_s: float = 120.0):
        super().__init__()
        self.retries, self.backoff, self.landing_s, self.cancel_wait_s = retries, backoff, landing_s, cancel_wait_s

    def client(self, namespace: str | None) -> HfJobs:
        return HfJobs(self.credential_value(), namespace, retries=self.retries, backoff=self.backoff)

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        news = whole_numbers(news, JOB_INTEGER_KEYS)
        known = {key: value for key, value in news.items() if not is_unknown(value)}
        failures: list[CheckFailure] = []
        if "image" in known and not (isinstance(known["image"], str) and is_pinned(known["image"])):
            failures.append(CheckFailure("image", "must be a pinned image reference (a version tag or @sha256 digest, "
                                                  f"never latest): {known['image']!r}"))
        if "flavor" in known and known["flavor"] not in catalog.HFJOBS_FLAVORS:
            failures.append(CheckFailure("flavor", f"unknown flavor {known['flavor']!r}; allowed: "
                                                   + ", ".join(catalog.HFJOBS_FLAVORS)))
        timeout = known.get("timeoutSeconds")
        if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 60:
            # unset, the server stops the job after 30 minutes: the limits must always be sent
            failures.append(CheckFailure("timeoutSeconds", f"must be whole seconds, at least 60 (got {timeout!r})"))
        command = known.get("command")
        if not (isinstance(command, list) and command and all(isinstance(part, str) for part in command)):
            failures.append(CheckFailure("command", "must be a non-empty list of strings"))
        for key in ("environment", "secrets"):
            if key in known:
                failures += _variable_failures(key, known[key])
        environment = known.get("environment")
        if isinstance(environment, dict) and environment.get(ENV_MANAGED) != "1":
            failures.append(CheckFailure("environment", f"every lorastack job carries {ENV_MANAGED}=1"))
        labels = known.get("labels")
        if not (isinstance(labels, dict) and labels.get(ENV_MANAGED) == "1" and labels.get(LABEL_STACK)
                and labels.get(LABEL_RUN)):
            failures.append(CheckFailure("labels", f"must carry {ENV_MANAGED}=1, {LABEL_STACK} and {LABEL_RUN} "
                                                   "(the retry-safe create and the reaper find jobs by them)"))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]):
        olds, news = whole_numbers(olds, JOB_INTEGER_KEYS), whole_numbers(news, JOB_INTEGER_KEYS)
        return keyed_diff(olds, news, JOB_REPLACE_KEYS, (), delete_before_replace=True)

    def create(self, props: dict[str, Any]) -> CreateResult:
        props = whole_numbers(props, JOB_INTEGER_KEYS)
        client = self.client(props.get("namespace"))
        job = self._create_once(client, props)
        return CreateResult(job.id, _outputs(props, job, client.namespace))

    def _create_once(self, client: HfJobs, props: dict[str, Any]):
        """POST without blind retries: before every try, look by our labels for what an earlier try created."""
        for attempt in range(self.retries + 1):
            existing = _live_job(client, props)
            if existing is not None:
                return existing
            try:
                return client.run(props)
            except Exception as error:
                if not is_transient(error) or attempt == self.retries:
                    raise
            landed = self._await_landing(client, props)  # a POST that failed may still be creating the job
            if landed is not None:
                return landed
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _await_landing(self, client: HfJobs, props: dict[str, Any]):
        deadline = time.monotonic() + self.landing_s
        while time.monotonic() < deadline:
            existing = _live_job(client, props)
            if existing is not None:
                return existing
            time.sleep(min(1.0, self.landing_s / 10))
        return None

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        client = self.client(props.get("namespace"))
        try:
            job = client.inspect(id_)
        except Exception as error:
            if is_not_found(error):
                return ReadResult("", {})
            raise
        if job.status.stage in UNFINISHED_STAGES:
            return ReadResult("", {})  # ended without finishing: the engine drops it, the next up resumes
        return ReadResult(id_, _outputs(whole_numbers(props, JOB_INTEGER_KEYS), job, client.namespace))

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        raise RuntimeError("a Hugging Face job cannot be changed; every change replaces it (diff says so)")

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        """Cancel the job unless it has ended already (cancel stops its billing; a job is never deleted), then wait
        for it to end: a trainer that is stopping still uploads its last checkpoint, and the repo must not be
        deleted (keepOnDestroy: false) before that upload, or the upload would create it again."""
        client = self.client(props.get("namespace"))
        deadline = time.monotonic() + self.cancel_wait_s
        try:
            if client.inspect(id_).status.stage not in TERMINAL_STAGES:
                client.cancel(id_)
            while client.inspect(id_).status.stage not in TERMINAL_STAGES and time.monotonic() < deadline:
                time.sleep(1.0)
        except Exception as error:
            if not is_not_found(error):
                raise


def _live_job(client: HfJobs, props: dict[str, Any]):
    """A job of this stack and run that is not over, from an earlier try of this create."""
    labels = props["labels"]
    wanted = {key: labels[key] for key in (ENV_MANAGED, LABEL_STACK, LABEL_RUN)}
    return next((job for job in client.list(wanted)
                 if job.status.stage not in TERMINAL_STAGES and job.flavor == props["flavor"]
                 and all((job.labels or {}).get(key) == value for key, value in wanted.items())), None)


def _variable_failures(key: str, variables: Any) -> list[CheckFailure]:
    if not isinstance(variables, dict):
        return [CheckFailure(key, "must be a mapping of variable names to strings")]
    failures = [CheckFailure(key, f"{name!r}: a variable name is letters, digits and underscores, not starting "
                                  "with a digit") for name in variables if not _ENV_NAME.match(name)]
    # values are not echoed: they may be secrets
    return failures + [CheckFailure(key, f"{name}: the value must be a string") for name, value in variables.items()
                       if not is_unknown(value) and not isinstance(value, str)]


def _outputs(props: dict[str, Any], job, namespace: str) -> dict[str, Any]:
    inputs = {key: value for key, value in props.items() if key != PROVIDER_KEY}
    created = job.created_at.isoformat() if job.created_at else None
    return {**inputs, "jobId": job.id, "stage": job.status.stage, "owner": namespace, "url": job.url,
            "createdAt": created}


@dataclass
class JobArgs:
    image: pulumi.Input[str]
    flavor: pulumi.Input[str]
    command: pulumi.Input[list[str]]
    environment: pulumi.Input[dict[str, str]]
    secrets: pulumi.Input[dict[str, str]]  # a secret Output when it holds a token
    timeout_seconds: pulumi.Input[int]
    labels: pulumi.Input[dict[str, str]]
    namespace: pulumi.Input[str] | None = None


class Job(pulumi.dynamic.Resource, module="hfjobs", name="Job"):
    jobId: pulumi.Output[str]
    stage: pulumi.Output[str]
    url: pulumi.Output[str]

    def __init__(self, resource_name: str, args: JobArgs, opts: pulumi.ResourceOptions | None = None):
        props = {
            "namespace": args.namespace,
            "image": args.image,
            "flavor": args.flavor,
            "command": args.command,
            "environment": args.environment,
            "secrets": args.secrets,
            "timeoutSeconds": args.timeout_seconds,
            "labels": args.labels,
            "jobId": None,
            "stage": None,
            "owner": None,
            "url": None,
            "createdAt": None,
        }
        # the provider host returns plain values: the secrets are marked secret again in the state
        fixed = pulumi.ResourceOptions(additional_secret_outputs=["secrets"], delete_before_replace=True)
        super().__init__(JobProvider(), resource_name, props, pulumi.ResourceOptions.merge(opts, fixed))
