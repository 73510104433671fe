"""The Vast.ai instance provider, the trainer's host, the ops commands and the reaper against emulator/vast.py, and
every request they sent checked against the vendor's OpenAPI spec (tests/contracts/vastai-openapi.yaml, a
verbatim copy of shared/reference/vastai-openapi.yaml: vast-ai/docs api-reference/openapi.yaml, last changed in
e758d3501e43 of 2026-07-22). Where the spec and vast-cli disagree (shared/reference/vastai-api.md), the cli's form
is accepted too: the trailing slash, `env` as a dict, `type: on-demand`, `owner=me` on show instance."""

from __future__ import annotations

import json
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
import yaml

from cloudapi.hosts import VastHost, host_from_environment
from cloudapi.vast_rest import VastClient, VastError
from contract.spec import ENV_LIMITS, ENV_MANAGED, ENV_STACK
from emulator.server import Fault, serve
from emulator.vast import VastApi, offer
from infra.vast_backend import runs
from infra.vast_backend.instance import InstanceProvider

SPEC = yaml.safe_load((Path(__file__).parent / "contracts" / "vastai-openapi.yaml").read_text())
# what vast-cli sends beyond the spec (vastai-api.md): accepted as the emulator accepts it
CLI_QUERY_PARAMS = {("GET", "/api/v0/instances/{id}"): {"owner"}}
CLI_BODY_KEYS = {("PUT", "/api/v0/asks/{id}"): {"client_id"}}
EMULATOR_ONLY = re.compile(r"^/emulator-logs/")  # the result_url of request_logs: S3's, not the API's
KEY = "vast-test-key"
LIMITS = json.dumps({"maxHours": 1, "maxCostUsd": 1, "usdPerHour": 0.5})


def operation(method: str, path: str) -> tuple[str, dict]:
    path = path.rstrip("/") or "/"
    for template, item in SPEC["paths"].items():
        pattern = "^" + re.sub(r"\{\w+\}", r"[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return template, item[method.lower()]
    raise AssertionError(f"{method} {path} is not in the Vast.ai spec")


def spec_form(body: dict, template: str) -> dict:
    """The cli's forms turned into the spec's, after checking them."""
    body = dict(body)
    if isinstance(body.get("env"), dict):
        assert all(isinstance(value, str) for value in body["env"].values()), "cli env values are strings"
        body["env"] = " ".join(f"-e {name}={shlex.quote(value)}" for name, value in body["env"].items())
    if body.get("type") == "on-demand":
        body["type"] = "ondemand"
    for key in CLI_BODY_KEYS.get(("PUT", template), ()):
        body.pop(key, None)
    return body


def validate(request) -> None:
    template, op = operation(request.method, request.path)
    assert request.headers.get("authorization", "").startswith("Bearer "), f"{request.method} {request.path}: no Bearer"
    allowed = {p["name"] for p in op.get("parameters", []) if p.get("in") == "query"}
    allowed |= CLI_QUERY_PARAMS.get((request.method, template), set())
    assert set(request.query) <= allowed, f"{request.method} {template}: query {set(request.query) - allowed}"
    for parameter in op.get("parameters", []):
        if parameter.get("in") == "query" and parameter["name"] in request.query:
            value = request.query[parameter["name"]]
            schema = parameter.get("schema", {})
            if schema.get("type") == "integer":
                assert value.isdigit() and int(value) <= schema.get("maximum", int(value)), (template, parameter["name"])
            if parameter["name"] in ("select_filters", "order_by"):
                json.loads(value)  # JSON text, as the spec says
    schema = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
    if request.body in (None, {}) and schema is None:
        return
    assert schema is not None, f"{request.method} {template} takes no body, got {request.body!r}"
    body = spec_form(request.body, template)
    known = set(schema.get("properties", {}))
    assert set(body) <= known, f"{request.method} {template}: keys not in the spec: {set(body) - known}"
    jsonschema.validate(body, {**schema, "components": SPEC.get("components", {})})


@pytest.fixture
def vast(monkeypatch):
    offers = [offer(101, "RTX 4090", 0.45, reliability=0.97), offer(102, "RTX 4090", 0.52),
              offer(103, "RTX 4090", 0.39, verified=False), offer(104, "RTX 4090", 0.60), offer(105, "RTX 3090", 0.2),
              offer(106, "RTX 4090", 0.53), offer(107, "RTX 4090", 0.54), offer(108, "RTX 4090", 0.545)]
    api = VastApi(KEY, offers)
    with serve(api) as url:
        monkeypatch.setenv("VAST_URL", url)
        monkeypatch.setenv("VAST_API_KEY", KEY)
        yield api


def props(**changes) -> dict:
    return {"label": "lorastack-unit", "image": "ghcr.io/lorastack/trainer:0.1.0", "gpuName": "RTX 4090",
            "gpuCount": 1.0, "minReliability": 0.98, "maxUsdPerHour": 0.55, "diskGb": 80.0, "verified": True,
            "env": {ENV_MANAGED: "1", ENV_STACK: "unit", ENV_LIMITS: LIMITS, "LORASTACK_SPEC": '{"a": "b c"}'},
            **changes}


def provider() -> InstanceProvider:
    return InstanceProvider(retries=3, backoff=0.01, timeout=1.0)


def test_create_rents_the_cheapest_matching_offer_and_every_request_is_in_the_spec(vast):
    created = provider().create(props())
    # 103 is cheaper but unverified, 101 below the reliability floor, 104 above the ceiling, 105 another GPU
    assert created.outs["offerId"] == 102 and created.outs["dphTotal"] == 0.52
    instance = vast.instances[int(created.id)]
    assert instance.label == "lorastack-unit" and instance.env["LORASTACK_SPEC"] == '{"a": "b c"}'
    read = provider().read(created.id, created.outs)
    assert read.outs["status"] == "running"

    client = VastClient(KEY, backoff=0.01)
    vast.append_log(int(created.id), "step 1")
    assert "step 1" in client.logs(created.id, interval_s=0.01)
    provider().delete(created.id, created.outs)
    provider().delete(created.id, created.outs)  # gone already: still fine
    assert vast.instances == {} and 102 in vast.offers  # the offer is back on the market
    assert provider().read(created.id, created.outs).id == ""

    for request in vast.bodies:
        if not EMULATOR_ONLY.match(request.path):
            validate(request)
    assert any(request.path.endswith("/") for request in vast.bodies)  # vast-cli's paths, with the slash


def test_a_lost_create_answer_adopts_the_instance_instead_of_renting_twice(vast):
    # the PUT is handled, but its answer comes after the client gave up
    vast.inject(Fault(status=0, delay=1.5, method="PUT", path_prefix="/api/v0/asks/"))
    created = provider().create(props())
    assert len(vast.instances) == 1 and int(created.id) in vast.instances


def test_429_and_5xx_are_retried_and_a_taken_offer_moves_to_the_next(vast):
    vast.inject(Fault(status=429, count=2, method="POST", path_prefix="/api/v0/bundles"))
    vast.inject(Fault(status=503, method="GET", path_prefix="/api/v1/instances"))
    taken = vast.offers.pop(102)
    vast.offers[102] = {**taken}
    original = vast.create_instance

    def taken_first(request):  # someone rents 102 between our search and our PUT
        if request.params["id"] == "102" and 102 in vast.offers:
            vast.offers.pop(102)
        return original(request)

    vast._routes = [(m, p, taken_first if h == original else h) for m, p, h in vast._routes]
    created = provider().create(props())
    assert created.outs["offerId"] == 106  # the next cheapest
    assert 102 not in vast.offers and len(vast.instances) == 1


def test_no_matching_offer_says_which_setting_to_change(vast):
    with pytest.raises(RuntimeError, match="raise maxUsdPerHour"):
        provider().create(props(maxUsdPerHour=0.3))
    assert vast.instances == {}


def test_a_lost_host_replaces_the_instance_and_changed_inputs_replace_it_old_first(vast):
    created = provider().create(props())
    same = provider().diff(created.id, created.outs, props())
    assert not same.changes
    lost = provider().diff(created.id, {**created.outs, "status": "offline"}, props())
    assert lost.replaces == ["status"] and lost.delete_before_replace
    changed = provider().diff(created.id, created.outs, props(diskGb=100.0))
    assert changed.replaces == ["diskGb"]


def test_the_listing_pages_by_25(vast):
    for number in range(30):
        vast.offers[1000 + number] = offer(1000 + number, "RTX 3090", 0.2)
        VastClient(KEY).create_instance(1000 + number, {"image": "x:1", "label": f"l{number}", "env": {}})
    assert len(list(VastClient(KEY).list_instances())) == 30
    pages = [r for r in vast.bodies if r.path.startswith("/api/v1/instances")]
    assert len(pages) == 2 and "after_token" in pages[1].query
    for request in pages:
        validate(request)


def test_the_trainer_destroys_its_own_instance_with_its_container_key_only(vast):
    created = provider().create(props())
    instance = vast.instances[int(created.id)]
    other = provider().create(props(label="lorastack-other"))
    environ = {"CONTAINER_ID": created.id, "CONTAINER_API_KEY": instance.api_key, "VAST_URL": VastClient(KEY).base_url}
    host = host_from_environment(environ, print)
    assert isinstance(host, VastHost) and host.machine_id == created.id
    # the container key reaches no other instance
    with pytest.raises(VastError, match="403"):
        VastClient(instance.api_key, retries=0).destroy_instance(other.id)
    assert host.stop(retries=2, backoff_s=0.01)
    assert int(created.id) not in vast.instances and int(other.id) in vast.instances
    for request in vast.bodies:
        if not EMULATOR_ONLY.match(request.path):
            validate(request)


def test_the_reaper_destroys_orphans_exited_instances_and_runs_past_their_limits(vast):
    client = VastClient(KEY, backoff=0.01)
    orphan = provider().create(props(label="lorastack-gone", env={**props()["env"], ENV_STACK: "gone"}))
    exited = provider().create(props(label="lorastack-live"))
    running = provider().create(props(label="lorastack-live2", env={**props()["env"], ENV_STACK: "live2"}))
    over = provider().create(props(label="lorastack-live3", env={**props()["env"], ENV_STACK: "live3"}))
    vast.offers[900] = offer(900, "RTX 4090", 0.5)
    foreign = client.create_instance(900, {"image": "someone/else:1", "label": "lorastack-foreign", "env": {}})
    vast.instances[int(exited.id)].actual_status = "exited"
    vast.instances[int(over.id)].start_date -= 2 * 3600
    decisions = {d.resource_id: d for d in runs.reap(client, {"unit", "live2", "live3"}, dry_run=False,
                                                      now=datetime.now(UTC), grace_minutes=10)}
    assert decisions[orphan.id].terminate and "no live stack" in decisions[orphan.id].reason
    assert decisions[exited.id].terminate and "disk bills" in decisions[exited.id].reason
    assert decisions[over.id].terminate and "maxHours" in decisions[over.id].reason
    assert not decisions[running.id].terminate
    assert str(foreign["new_contract"]) not in decisions  # not ours: never touched
    assert set(vast.instances) == {int(running.id), foreign["new_contract"]}
