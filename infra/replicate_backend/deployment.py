"""Deployment: a Replicate deployment of the trained version, scaled to zero unless the stack pays for more.

The version, hardware SKU and instance counts change in place (PATCH: a new release of the same deployment);
its name or model are fixed, so changing them replaces it. Replicate deletes a deployment only once it has
been offline and unused for 15 minutes: `delete` scales it to 0 first, then deletes, and if Replicate still
refuses, fails with the time to run `pulumi destroy` again (a deployment that served a prediction in the
last 15 minutes is refused too, so that time is a lower bound).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, DiffResult, ReadResult, UpdateResult
from replicate.exceptions import ReplicateError

from infra.dynamic import is_unknown, keyed_diff, whole_numbers
from infra.replicate_backend import catalog
from infra.replicate_backend.client import ReplicateClient
from infra.replicate_backend.provider import ReplicateProvider, plain_inputs

DEPLOYMENT_REPLACE_KEYS = ("name", "model")
DEPLOYMENT_UPDATE_KEYS = ("version", "hardware", "minInstances", "maxInstances")
API_FIELDS = {"version": "version", "hardware": "hardware", "minInstances": "min_instances", "maxInstances": "max_instances"}
OFFLINE_BEFORE_DELETE = timedelta(minutes=15)
MAX_MIN_INSTANCES, MAX_MAX_INSTANCES = 5, 20  # the API's bounds
# Pulumi hands a provider its numbers as floats (1 arrives as 1.0); the API takes integers
DEPLOYMENT_INTEGER_KEYS = ("minInstances", "maxInstances")
_VERSION_ID = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class DeploymentProvider(ReplicateProvider):
    """Inputs: name, model (owner/name), version (64-hex id), hardware, minInstances, maxInstances.
    Outputs add deploymentId (owner/name), owner, release (its number) and url."""

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        news = whole_numbers(news, DEPLOYMENT_INTEGER_KEYS)
        failures = []
        known = {key: value for key, value in news.items() if not is_unknown(value)}

        def fail(key: str, reason: str) -> None:
            failures.append(CheckFailure(key, reason))

        if "name" in known and not (isinstance(known["name"], str) and _NAME.match(known["name"])):
            fail("name", f"lowercase letters, digits, dashes, underscores and periods (got {known['name']!r})")
        if "model" in known and not (isinstance(known["model"], str) and known["model"].count("/") == 1):
            fail("model", f"the model as owner/name (got {known['model']!r})")
        if "version" in known and not (isinstance(known["version"], str) and _VERSION_ID.match(known["version"])):
            fail("version", f"the 64-character id of a model version (got {known['version']!r}); "
                            "a deployment needs a finished training")
        if "hardware" in known and known["hardware"] not in catalog.REPLICATE_HARDWARE_USD_PER_SECOND:
            fail("hardware", f"{known['hardware']!r} is not a GPU SKU; allowed: "
                             + ", ".join(catalog.REPLICATE_HARDWARE_USD_PER_SECOND))
        low, high = known.get("minInstances", 0), known.get("maxInstances", 1)
        if not _count(low, MAX_MIN_INSTANCES):
            fail("minInstances", f"a whole number from 0 to {MAX_MIN_INSTANCES} (got {low!r})")
        if not _count(high, MAX_MAX_INSTANCES) or high == 0:
            fail("maxInstances", f"a whole number from 1 to {MAX_MAX_INSTANCES} (got {high!r})")
        elif _count(low, MAX_MIN_INSTANCES) and low > high:
            fail("minInstances", f"minInstances ({low}) is above maxInstances ({high})")
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        olds, news = whole_numbers(olds, DEPLOYMENT_INTEGER_KEYS), whole_numbers(news, DEPLOYMENT_INTEGER_KEYS)
        # same name: the old one must go before the new one can be created
        return keyed_diff(olds, news, DEPLOYMENT_REPLACE_KEYS, DEPLOYMENT_UPDATE_KEYS, delete_before_replace=True)

    def create(self, props: dict[str, Any]) -> CreateResult:
        props = whole_numbers(props, DEPLOYMENT_INTEGER_KEYS)
        client = self.client()
        body = {"name": props["name"], "model": props["model"],
                **{api: props[key] for key, api in API_FIELDS.items()}}


        def made_by_an_earlier_try() -> dict | None:
            found = _find_by_name(client, props["name"])
            return found if found is not None and found["current_release"]["model"] == props["model"] else None

        try:
            deployment = client.create_once(lambda: client.post_once("/v1/deployments", body), made_by_an_earlier_try)
        except ReplicateError as error:
            existing = client.retrying(lambda: _find_by_name(client, props["name"])) if error.status == 409 else None
            if existing is None or existing["current_release"]["model"] != props["model"]:
                raise
            # an earlier try of this create made it, or it outlived a state that forgot it: adopt, then converge
            deployment = _converge(client, existing, props)
        return CreateResult(_deployment_id(deployment), _outputs(props, deployment))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        deployment = _get(self.client(), id_)
        if deployment is None:
            return ReadResult("", {})
        config = deployment["current_release"]["configuration"]
        live = {**props, "model": deployment["current_release"]["model"], "version": deployment["current_release"]["version"],
                "hardware": config["hardware"], "minInstances": config["min_instances"], "maxInstances": config["max_instances"]}
        return ReadResult(id_, _outputs(live, deployment))

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        news = whole_numbers(news, DEPLOYMENT_INTEGER_KEYS)
        client = self.client()
        deployment = _get(client, id_)
        if deployment is None:
            raise RuntimeError(f"deployment {id_} no longer exists on Replicate; run `pulumi refresh`, then `pulumi up`")
        return UpdateResult(_outputs(news, _converge(client, deployment, news)))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        client = self.client()
        deployment = _get(client, id_)
        if deployment is None:
            return
        owner, name = id_.split("/", 1)
        scaled_now = deployment["current_release"]["configuration"]["min_instances"] > 0
        if scaled_now:
            client.json("PATCH", f"/v1/deployments/{id_}", json={"min_instances": 0})
        try:
            client.sdk.deployments.delete(owner, name)
        except ReplicateError as error:
            if error.status == 404:
                return
            if error.status not in (400, 409):
                raise
            retry_at = datetime.now(UTC) + OFFLINE_BEFORE_DELETE
            raise RuntimeError(
                f"Replicate refused to delete deployment {id_} ({error.detail}). It deletes a deployment only after it "
                "has been offline and unused for 15 minutes. "
                + ("It was scaled to 0 instances just now. " if scaled_now else "It is scaled to 0 instances. ")
                + f"Run `pulumi destroy` again after {retry_at:%H:%M} UTC (later if it served predictions since)."
            ) from None


def _count(value: Any, maximum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum


def _deployment_id(deployment: dict) -> str:
    return f"{deployment['owner']}/{deployment['name']}"


def _get(client: ReplicateClient, deployment_id: str) -> dict | None:
    try:
        return client.json("GET", f"/v1/deployments/{deployment_id}")
    except ReplicateError as error:
        if error.status == 404:
            return None
        raise


def _find_by_name(client: ReplicateClient, name: str) -> dict | None:
    page = client.json("GET", "/v1/deployments")
    return next((d for d in page.get("results", []) if d["name"] == name), None)


def _converge(client: ReplicateClient, deployment: dict, props: dict[str, Any]) -> dict:
    """PATCH what differs between the live release and the inputs (one new release, or none)."""
    release = deployment["current_release"]
    live = {"version": release["version"], **release["configuration"]}
    changes = {api: props[key] for key, api in API_FIELDS.items() if live.get(api) != props[key]}
    if not changes:
        return deployment
    return client.json("PATCH", f"/v1/deployments/{_deployment_id(deployment)}", json=changes)


def _outputs(props: dict[str, Any], deployment: dict) -> dict[str, Any]:
    return {
        **plain_inputs(props),
        "deploymentId": _deployment_id(deployment),
        "owner": deployment["owner"],
        "release": deployment["current_release"]["number"],
        "url": f"https://replicate.com/deployments/{_deployment_id(deployment)}",
    }


@dataclass
class DeploymentArgs:
    name: pulumi.Input[str]
    model: pulumi.Input[str]  # owner/name
    version: pulumi.Input[str]  # the trained version's 64-hex id
    hardware: pulumi.Input[str]
    min_instances: pulumi.Input[int] = 0  # scale to zero: nothing billed while idle
    max_instances: pulumi.Input[int] = 1


class Deployment(pulumi.dynamic.Resource, module="replicate", name="Deployment"):
    deploymentId: pulumi.Output[str]
    owner: pulumi.Output[str]
    release: pulumi.Output[int]
    url: pulumi.Output[str]

    def __init__(self, resource_name: str, args: DeploymentArgs, opts: pulumi.ResourceOptions | None = None):
        props = {
            "name": args.name,
            "model": args.model,
            "version": args.version,
            "hardware": args.hardware,
            "minInstances": args.min_instances,
            "maxInstances": args.max_instances,
            "deploymentId": None,
            "owner": None,
            "release": None,
            "url": None,
        }
        super().__init__(DeploymentProvider(), resource_name, props, opts)
