"""Model: the Replicate model a training pushes its versions into, as a Pulumi dynamic resource.

Replicate's API creates a model, reads it and changes its description (PATCH); it cannot change visibility
or hardware, and deletes a model only when it is private and has no versions. So:
- owner or name changed: a new model (replace);
- description: updated in place;
- visibility: refused with what to do (change it on replicate.com, then `pulumi refresh` reads it back);
- hardware (the SKU web predictions of the model run on; deployments and trainings choose their own):
  recorded in the state only;
- on destroy the model is kept (`keepOnDestroy`, default true; the component also gives it the
  `retain_on_delete` option, so the engine says "retained" and never calls delete). With keepOnDestroy: false,
  a model that still has versions or is public is not deleted: the error lists the versions and how to
  delete them. A later `pulumi up` adopts an existing model of the same owner/name (a kept one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, DiffResult, ReadResult, UpdateResult
from replicate.exceptions import ReplicateError

from infra.dynamic import is_unknown, keyed_diff
from infra.replicate_backend import catalog
from infra.replicate_backend.client import ReplicateClient
from infra.replicate_backend.provider import ReplicateProvider, plain_inputs

MODEL_REPLACE_KEYS = ("owner", "name")
MODEL_UPDATE_KEYS = ("description", "visibility", "hardware", "keepOnDestroy")
HARDWARE_SKUS = ("cpu", *catalog.REPLICATE_HARDWARE_USD_PER_SECOND)
_OWNER = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def model_url(owner: str, name: str) -> str:
    return f"https://replicate.com/{owner}/{name}"


class ModelProvider(ReplicateProvider):
    """Inputs: owner, name, visibility, hardware, description, keepOnDestroy.
    Outputs add modelId (owner/name), url and latestVersion (as of the last create, update or refresh)."""

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = []
        known = {key: value for key, value in news.items() if not is_unknown(value)}
        if "owner" in known and not (isinstance(known["owner"], str) and _OWNER.match(known["owner"])):
            failures.append(CheckFailure("owner", f"a Replicate user or organization name, lowercase (got {known['owner']!r})"))
        if "name" in known and not (isinstance(known["name"], str) and _NAME.match(known["name"])):
            failures.append(CheckFailure(
                "name", f"lowercase letters, digits, dashes, underscores and periods (got {known['name']!r})"
            ))
        if known.get("visibility", "private") not in ("private", "public"):
            failures.append(CheckFailure("visibility", f"private or public (got {known['visibility']!r})"))
        if known.get("hardware", "cpu") not in HARDWARE_SKUS:
            failures.append(CheckFailure("hardware", f"{known['hardware']!r} is not a SKU; allowed: {', '.join(HARDWARE_SKUS)}"))
        if not isinstance(known.get("keepOnDestroy", True), bool):
            failures.append(CheckFailure("keepOnDestroy", "must be true or false"))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        return keyed_diff(olds, news, MODEL_REPLACE_KEYS, MODEL_UPDATE_KEYS)

    def create(self, props: dict[str, Any]) -> CreateResult:
        client = self.client()
        owner, name = props["owner"], props["name"]
        model = client.retrying(lambda: _get_model(client, owner, name))
        if model is None:

            def post() -> dict:
                try:
                    return client.post_once("/v1/models", _create_body(props))
                except ReplicateError as error:
                    if error.status != 409:  # 409: an earlier try of this create made it after all
                        raise
                    # the 409 says the model exists, so the look-up finds it
                    return cast(dict, client.retrying(lambda: _get_model(client, owner, name)))

            model = client.create_once(post, lambda: _get_model(client, owner, name))
        elif model["visibility"] != props["visibility"]:
            raise RuntimeError(
                f"{owner}/{name} already exists on Replicate as a {model['visibility']} model; this stack asks for "
                f"{props['visibility']}. Adopting it would change nothing: set replicate.visibility: {model['visibility']} "
                f"in the stack, or change it at {model_url(owner, name)}/settings"
            )
        if (props.get("description") or None) != model.get("description"):
            model = client.update_model(owner, name, description=props.get("description") or "")
        return CreateResult(f"{owner}/{name}", _outputs(props, model))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        owner, name = id_.split("/", 1)
        model = _get_model(self.client(), owner, name)
        if model is None:
            return ReadResult("", {})  # deleted outside Pulumi: the engine drops it from the state
        live = {**props, "visibility": model["visibility"], "description": model.get("description")}
        return ReadResult(id_, _outputs(live, model))

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        owner, name = id_.split("/", 1)
        if olds.get("visibility") != news["visibility"]:
            raise RuntimeError(
                f"Replicate's API cannot change a model's visibility ({owner}/{name}: {olds.get('visibility')} -> "
                f"{news['visibility']}). Change it at {model_url(owner, name)}/settings, then run `pulumi refresh` "
                "and `pulumi up` again"
            )
        client = self.client()
        model: dict | None
        if olds.get("description") != news.get("description"):
            model = client.update_model(owner, name, description=news.get("description") or "")
        else:
            model = _get_model(client, owner, name)
            if model is None:
                raise RuntimeError(f"{owner}/{name} no longer exists on Replicate; run `pulumi refresh`, then `pulumi up`")
        return UpdateResult(_outputs(news, model))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        if props.get("keepOnDestroy", True):
            return  # normally never called for a kept model (retain_on_delete); a safe no-op if it is
        owner, name = id_.split("/", 1)
        client = self.client()
        model = _get_model(client, owner, name)
        if model is None:
            return
        versions = client.list_versions(id_)
        if model["visibility"] != "private" or versions:
            raise RuntimeError(undeletable_model_message(owner, name, model["visibility"], [v["id"] for v in versions]))
        client.sdk.models.delete(owner, name)


def undeletable_model_message(owner: str, name: str, visibility: str, version_ids: list[str]) -> str:
    """Why Replicate will not delete this model and how to make it deletable, or keep it."""
    lines = [f"Not deleting {owner}/{name}: Replicate deletes only private models that have no versions."]
    if visibility != "private":
        lines.append(f"It is {visibility}: make it private at {model_url(owner, name)}/settings first.")
    if version_ids:
        lines.append(f"It has {len(version_ids)} version(s): {', '.join(version_ids)}.")
        lines.append(
            "Deleting a version deletes its predictions and output files; versions with a deployment, or used as "
            "a base for another training, cannot be deleted. To delete them:"
        )
        lines += [
            f'  curl -s -X DELETE -H "Authorization: Bearer $REPLICATE_API_TOKEN" '
            f"https://api.replicate.com/v1/models/{owner}/{name}/versions/{version_id}"
            for version_id in version_ids
        ]
    lines.append(
        "then run `pulumi destroy` again. Or keep the model: set replicate.keepModelOnDestroy: true, `pulumi up`, "
        "then `pulumi destroy` (the model is retained and dropped from the state)."
    )
    return "\n".join(lines)


def _get_model(client: ReplicateClient, owner: str, name: str) -> dict | None:
    try:
        return client.json("GET", f"/v1/models/{owner}/{name}")
    except ReplicateError as error:
        if error.status == 404:
            return None
        raise


def _create_body(props: dict[str, Any]) -> dict[str, Any]:
    body = {"owner": props["owner"], "name": props["name"], "visibility": props["visibility"], "hardware": props["hardware"]}
    if props.get("description"):
        body["description"] = props["description"]
    return body


def _outputs(props: dict[str, Any], model: dict) -> dict[str, Any]:
    latest = model.get("latest_version") or {}
    return {
        **plain_inputs(props),
        "modelId": f"{model['owner']}/{model['name']}",
        "url": model.get("url") or model_url(model["owner"], model["name"]),
        "latestVersion": latest.get("id"),
    }


@dataclass
class ModelArgs:
    owner: pulumi.Input[str]
    name: pulumi.Input[str]
    hardware: pulumi.Input[str]
    visibility: pulumi.Input[str] = "private"
    description: pulumi.Input[str] | None = None
    keep_on_destroy: pulumi.Input[bool] = True


class Model(pulumi.dynamic.Resource, module="replicate", name="Model"):
    modelId: pulumi.Output[str]
    url: pulumi.Output[str]
    latestVersion: pulumi.Output[str | None]

    def __init__(self, resource_name: str, args: ModelArgs, opts: pulumi.ResourceOptions | None = None):
        props = {
            "owner": args.owner,
            "name": args.name,
            "visibility": args.visibility,
            "hardware": args.hardware,
            "description": args.description,
            "keepOnDestroy": args.keep_on_destroy,
            "modelId": None,
            "url": None,
            "latestVersion": None,
        }
        super().__init__(ModelProvider(), resource_name, props, opts)
