"""Lambda Cloud as a lorastack backend: a persistent filesystem and an instance booting our trainer image
(infra.backends.Backend)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import requests

from cloudapi.lambda_rest import GONE_STATUSES, LambdaClient, LambdaError
from contract.naming import pod_name
from infra.backends import LivePrices, OpsError, ReapDecision, Report, RunsOurTrainer, short_error
from infra.credentials import SECRETS
from infra.lambda_backend import reap as reap_rules
from infra.lambda_backend.catalog import FILESYSTEM_USD_PER_GIB_MONTH, lambda_usd_per_hour
from infra.lambda_backend.config import LambdaConfig
from infra.lambda_backend.user_data import CONTAINER_NAME, filesystem_mount
from infra.table import render_table

if TYPE_CHECKING:
    from infra.config import StackConfig

KEY_HINT = "export LAMBDA_API_KEY (cloud.lambda.ai > API keys), and LAMBDA_API_BASE_URL if you use another endpoint"


def api_key(environ: Mapping[str, str]) -> str | None:
    return environ.get(SECRETS["lambdaApiKey"]) or None


def client_from(environ: Mapping[str, str], **options: Any) -> LambdaClient:
    key = api_key(environ)
    if not key:
        raise OpsError(f"LAMBDA_API_KEY is not set: {KEY_HINT}")
    return LambdaClient(key, base_url=environ.get("LAMBDA_API_BASE_URL") or None, **options)


def stack_instances(client: LambdaClient, stack: str) -> list[dict]:
    return [instance for instance in client.list_instances()
            if instance.get("name") == pod_name(stack) and reap_rules.is_managed(instance)]


def _section(config: StackConfig) -> LambdaConfig:
    """The stack's `lorastack:lambda` section: StackConfig refuses a lambda stack without one, and this backend is
    only asked about its own stacks."""
    return cast(LambdaConfig, config.lambda_cloud)  # never None here (StackConfig's _backend check)


class LambdaBackend(RunsOurTrainer):
    name = "lambda"
    section = LambdaConfig
    ops_secrets = ("lambdaApiKey",)
    ops_optional_secrets = ()
    component = "infra.lambda_backend.component:LambdaTraining:LambdaTrainingArgs"

    def check(self, config: StackConfig) -> None:
        if config.wait:
            raise ValueError(
                "wait: true is not available with provider lambda: Lambda Cloud has no API for a run's log or its "
                "filesystem, so `pulumi up` cannot follow the run; set wait: false and use `make status` (and hfRepo "
                "to receive the LoRA on the Hugging Face Hub)"
            )

    def gpu_memory(self, config: StackConfig) -> tuple[str, float]:
        section = _section(config)
        return f"lambda.instanceType {section.instance_type!r}", section.kind.memory_gb

    def usd_per_hour(self, config: StackConfig, live: dict[str, dict] | None = None) -> tuple[float, str]:
        return lambda_usd_per_hour(_section(config).instance_type, live)

    def performance_gpu(self, config: StackConfig) -> tuple[str, int]:
        kind = _section(config).kind
        return kind.gpu, kind.gpu_count

    def hardware(self, config: StackConfig) -> str:
        section = _section(config)
        return f"{section.kind.label} ({section.instance_type}, {section.region})"

    def cost_notes(self, stack: str, config: StackConfig) -> list[str]:
        filesystem = _section(config).filesystem
        if filesystem is None:
            return []
        kept = "kept on destroy" if filesystem.keep_on_destroy else "deleted on destroy"
        return [f"{stack}: filesystem {pod_name(stack)}, about ${FILESYSTEM_USD_PER_GIB_MONTH:.2f}/GiB/month of what it "
                f"holds (billed hourly while it exists; {kept})"]

    def live_prices(self, environ: Mapping[str, str], timeout: float) -> LivePrices:
        """GET /api/v1/instance-types: {name: {instance_type, regions_with_capacity_available}}."""
        if not api_key(environ):
            return LivePrices(None, "Lambda Cloud: the dated table; LAMBDA_API_KEY is not set (export it for live prices)")
        try:
            types = client_from(environ, retries=0, timeout=timeout).instance_types()
        except (LambdaError, requests.RequestException, KeyError, TypeError, ValueError) as error:
            return LivePrices(None, f"Lambda Cloud: the dated table; the API did not answer usefully ({short_error(error)})")
        fetched_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return LivePrices(types, f"Lambda Cloud: live instance types (GET /api/v1/instance-types), fetched {fetched_at}")

    def live_warnings(self, config: StackConfig, live: Any) -> list[str]:
        section = _section(config)
        entry = (live or {}).get(section.instance_type)
        if live and entry is None:
            return [f"lambda.instanceType {section.instance_type!r} is no longer offered by Lambda Cloud"]
        if entry is None:
            return []
        regions = [region["name"] for region in entry.get("regions_with_capacity_available", [])]
        if section.region not in regions:
            where = ", ".join(regions) or "none"
            return [f"{section.instance_type} has no capacity in {section.region} right now (regions with capacity: "
                    f"{where}); a launch there fails until some frees up"]
        return []

    def status(self, stack: str, config: StackConfig, environ: Mapping[str, str]) -> Report:
        try:
            instances = stack_instances(client_from(environ), stack)
        except LambdaError as error:
            raise OpsError(f"{error} ({KEY_HINT})") from None
        if not instances:
            return Report([f"{stack}: no Lambda instance named {pod_name(stack)} (the run ended and terminated its "
                           "instance, or `pulumi up` has not run)"])
        now = datetime.now(UTC)
        rows = []
        for instance in instances:
            hours = reap_rules.hours_since_launch(instance, now)
            usd = instance["instance_type"]["price_cents_per_hour"] / 100
            rows.append((instance["id"], instance["status"], instance["instance_type"]["name"], instance["region"]["name"],
                         f"${usd:.2f}/h", "-" if hours is None else f"{hours:.2f} h",
                         "-" if hours is None else f"${hours * usd:.2f}"))
        table = render_table(("instance", "status", "type", "region", "price", "since launch", "cost so far"), rows, rule=False)
        return Report(table.splitlines())

    def logs(self, stack: str, config: StackConfig, environ: Mapping[str, str], emit: Callable[[str], None]) -> Report:
        try:
            live = [i for i in stack_instances(client_from(environ), stack) if i["status"] not in GONE_STATUSES]
        except LambdaError as error:
            raise OpsError(f"{error} ({KEY_HINT})") from None
        if not live or not live[0].get("ip"):
            raise OpsError(f"{stack}: no running Lambda instance; Lambda keeps no log of a terminated one (the "
                           "trainer's status.json and checkpoints stay on the filesystem)")
        return Report([f"Lambda Cloud has no log API; the trainer's log is the container's: "
                       f"ssh ubuntu@{live[0]['ip']} sudo docker logs --follow {CONTAINER_NAME}"])

    def fetch(self, stack: str, config: StackConfig, destination: Path, environ: Mapping[str, str]) -> Report:
        section = _section(config)
        where = (f"on the filesystem {pod_name(stack)} in {section.region} ({filesystem_mount(pod_name(stack))} on an "
                 "instance that mounts it)" if section.filesystem else "on the instance's own disk, gone with it")
        raise OpsError(f"{stack}: the LoRA is {where}; Lambda Cloud has no API to read a filesystem from outside. "
                       f"Set lorastack:train hfRepo to receive it on the Hugging Face Hub, or copy it with scp from a "
                       f"running instance into {destination}")

    def reap(self, live_stacks: set[str], environ: Mapping[str, str], *, dry_run: bool,
             grace_minutes: float) -> list[ReapDecision]:
        if not api_key(environ):
            return []  # no Lambda key configured: nothing of ours can be on Lambda for this account to find
        try:
            return reap_rules.reap(client_from(environ), live_stacks, dry_run=dry_run, now=datetime.now(UTC),
                                   grace_minutes=grace_minutes)
        except LambdaError as error:
            raise OpsError(f"{error} ({KEY_HINT})") from None


BACKEND = LambdaBackend()
