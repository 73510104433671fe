"""The Lambda Cloud providers and client against emulator/lambda_cloud.py over real HTTP, and every request they
send checked against Lambda's published OpenAPI (tests/lambda_contract.py).

Each provider goes through what the Pulumi host does with it: pickled by Pulumi's serializer, unpickled,
`configure()`d with the stack config; the tests then drive check/create/read/diff/update/delete.
"""

from __future__ import annotations

import base64
import time

import dill
import pytest
from pulumi.dynamic import Config, ConfigureRequest
from pulumi.dynamic.dynamic import serialize_provider

from cloudapi.hosts import LambdaHost, host_from_environment
from cloudapi.lambda_rest import LambdaClient, LambdaError
from emulator.lambda_cloud import LambdaCloudApi, read_user_data
from emulator.server import Fault, serve
from infra.lambda_backend import reap, user_data
from infra.lambda_backend.filesystem import FilesystemProvider
from infra.lambda_backend.instance import InstanceProvider
from infra.lambda_backend.provider import LambdaProvider
from tests import lambda_contract

API_KEY = "secret_lambda_test_key_0123456789"
REGION = "us-south-2"


@pytest.fixture
def api(monkeypatch):
    emulator = LambdaCloudApi(api_key=API_KEY, launch_interval_s=0.3)
    with serve(emulator) as base_url:
        monkeypatch.setenv("LAMBDA_API_BASE_URL", base_url)
        monkeypatch.delenv("LAMBDA_API_KEY", raising=False)
        emulator.base_url = base_url
        yield emulator
    # every request any test made was one the spec has, with a body its schema accepts
    assert [problem for method, path, body in emulator.request_bodies
            for problem in lambda_contract.problems(method, path, body)] == []


def hosted(provider: LambdaProvider, api_key: str | None = API_KEY) -> LambdaProvider:
    revived = dill.loads(base64.b64decode(serialize_provider(provider)))
    revived.configure(ConfigureRequest(Config({"lorastack:lambdaApiKey": api_key} if api_key else {}, "lorastack")))
    return revived


FAST = {"backoff": 0.01, "timeout": 2.0, "launch_interval_s": 0.3}


def instance_provider(**options) -> InstanceProvider:
    return hosted(InstanceProvider(**{**FAST, **options}))


def filesystem_provider(**options) -> FilesystemProvider:
    return hosted(FilesystemProvider(**{**FAST, **options}))


def instance_props(**changes) -> dict:
    env = {"LORASTACK_MANAGED": "1", "LAMBDA_INSTANCE_NAME": "lorastack-test", "LAMBDA_API_KEY": API_KEY}
    return {
        "name": "lorastack-test",
        "instanceTypeName": "gpu_1x_a10",
        "regionName": REGION,
        "sshKeyNames": ["my-laptop"],
        "fileSystemNames": [],
        "userData": user_data.render("ghcr.io/lorastack/trainer:0.1.0", env, None),
        "tags": [{"key": "lorastack-managed", "value": "1"}, {"key": "lorastack-stack", "value": "test"},
                 {"key": "lorastack-max-hours", "value": "1"}, {"key": "lorastack-max-cost-usd", "value": "5"}],
        **changes,
    }


def launches(api: LambdaCloudApi) -> int:
    return sum(1 for method, path, _ in api.request_bodies if path == "/api/v1/instance-operations/launch")


def client() -> LambdaClient:
    return LambdaClient(API_KEY, backoff=0.01, timeout=2.0)


# --- the contract ---------------------------------------------------------------------------------------------------


def test_the_contract_checker_catches_what_lambda_would_refuse():
    assert lambda_contract.problems("GET", "/api/v1/filesystems", None)  # listing is /file-systems
    assert lambda_contract.problems("POST", "/api/v1/instance-operations/launch", {"region_name": "us-south-2"})
    assert lambda_contract.problems("POST", "/api/v1/filesystems", {"name": "9bad", "region": REGION})
    assert lambda_contract.problems("POST", "/api/v1/instance-operations/launch", {
        "region_name": REGION, "instance_type_name": "gpu_1x_a10", "ssh_key_names": ["k"], "hostname": "Not_Valid",
    })
    assert lambda_contract.problems("POST", "/api/v1/instance-operations/launch", {
        "region_name": REGION, "instance_type_name": "gpu_1x_a10", "ssh_key_names": ["k"], "name": "lorastack-x",
        "tags": [{"key": "lorastack-stack", "value": "x"}], "user_data": "#cloud-config\n",
    }) == []
    assert lambda_contract.problems("POST", "/api/v1/instance-operations/terminate", {"instance_ids": "abc"})
    assert lambda_contract.problems("DELETE", "/api/v1/file-systems/abc", None)


def test_the_emulators_replies_match_the_specs_schemas(api):
    import requests

    fs = client().create_filesystem("lorastack-test", REGION)
    instance_provider().create(instance_props(fileSystemNames=[fs["name"]]))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for method, path, status in (("GET", "/api/v1/instances", 200), ("GET", "/api/v1/instance-types", 200),
                                 ("GET", "/api/v1/file-systems", 200), ("GET", "/api/v1/instances/nope", 404),
                                 ("DELETE", f"/api/v1/filesystems/{fs['id']}", 400)):
        reply = requests.request(method, api.base_url + path, headers=headers, timeout=5)
        assert reply.status_code == status
        assert lambda_contract.response_problems(method, path, status, reply.json()) == []
    unauthorized = requests.get(api.base_url + "/api/v1/instances", headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert unauthorized.status_code == 401
    assert lambda_contract.response_problems("GET", "/api/v1/instances", 401, unauthorized.json()) == []


# --- Filesystem -----------------------------------------------------------------------------------------------------


def test_filesystem_create_read_adopt_keep_and_delete(api):
    provider = filesystem_provider()
    props = {"name": "lorastack-test", "region": REGION, "keepOnDestroy": True}
    created = provider.create(props)
    assert created.outs["mountPoint"] == "/lambda/nfs/lorastack-test"
    assert provider.read(created.id, created.outs).id == created.id
    provider.delete(created.id, created.outs)  # kept
    assert created.id in api.filesystems
    again = provider.create(props)  # a kept filesystem is adopted, not duplicated
    assert again.id == created.id and len(api.filesystems) == 1
    provider.delete(created.id, {**created.outs, "keepOnDestroy": False})
    assert api.filesystems == {} and provider.read(created.id, created.outs).id == ""


def test_a_filesystem_moved_to_another_region_says_where_the_old_one_is(api):
    provider = filesystem_provider()
    provider.create({"name": "lorastack-test", "region": REGION, "keepOnDestroy": True})
    with pytest.raises(RuntimeError, match=f"already exists in {REGION}"):
        provider.create({"name": "lorastack-test", "region": "us-east-1", "keepOnDestroy": True})


def test_filesystem_check_names_bad_inputs(api):
    props = {"name": "9-starts-with-a-digit", "region": "mars-1", "keepOnDestroy": "no"}
    failures = filesystem_provider().check({}, props).failures
    assert {failure.property for failure in failures} == {"name", "region", "keepOnDestroy"}


def test_filesystem_delete_waits_for_the_instance_to_release_it(api):
    fs = filesystem_provider().create({"name": "lorastack-test", "region": REGION, "keepOnDestroy": False})
    instance = instance_provider().create(instance_props(fileSystemNames=["lorastack-test"]))
    with pytest.raises(LambdaError) as refused:
        client().delete_filesystem(fs.id)
    assert refused.value.status == 400 and refused.value.code == "filesystems/filesystem-in-use"
    instance_provider().delete(instance.id, instance.outs)  # the instance terminates; the mount is released
    filesystem_provider().delete(fs.id, fs.outs)
    assert api.filesystems == {}


# --- Instance -------------------------------------------------------------------------------------------------------


def test_instance_create_read_rename_delete(api):
    provider = instance_provider()
    created = provider.create(instance_props())
    record = api.instances[created.id]
    assert record.name == "lorastack-test" and created.outs["usdPerHour"] == 0.75
    launched = {tag["key"] for tag in record.tags}
    assert reap.TAG_LAUNCHED_AT in launched and reap.TAG_LAUNCHED_AT not in {t["key"] for t in created.outs["tags"]}
    assert provider.diff(created.id, created.outs, instance_props()).changes is False
    renamed = provider.update(created.id, created.outs, instance_props(name="lorastack-test2"))
    assert renamed.outs["name"] == "lorastack-test2" and api.instances[created.id].name == "lorastack-test2"
    provider.delete(created.id, created.outs)
    assert api.billing() == []
    deadline = time.monotonic() + 5
    while created.id in api.instances and time.monotonic() < deadline:
        time.sleep(0.05)
    assert provider.read(created.id, created.outs).id == ""  # gone: the engine drops it
    provider.delete(created.id, created.outs)  # idempotent


@pytest.mark.parametrize("key,value", [("instanceTypeName", "gpu_1x_h100_sxm5"), ("regionName", "us-east-1"),
                                       ("userData", "#cloud-config\n{}\n"), ("fileSystemNames", ["other"])])
def test_what_lambda_fixes_at_launch_replaces_the_instance_old_one_first(api, key, value):
    diff = instance_provider().diff("id", instance_props(), instance_props(**{key: value}))
    assert diff.replaces == [key] and diff.delete_before_replace


def test_instance_check_names_each_bad_input(api):
    failures = instance_provider().check({}, instance_props(
        name="", instanceTypeName="gpu_9x_nothing", regionName="mars-1", sshKeyNames=["a", "b"],
        userData="echo hi", tags=[{"key": "Bad Key", "value": "1"}],
    )).failures
    assert {f.property for f in failures} == {"name", "instanceTypeName", "regionName", "sshKeyNames", "userData", "tags"}
    assert all(API_KEY not in f.reason for f in failures)


def test_no_capacity_says_where_there_is_some(api):
    api.capacity = {"gpu_1x_a10": ("us-east-1", "us-west-1")}
    with pytest.raises(RuntimeError, match=r"no capacity for gpu_1x_a10 in us-south-2 .*us-east-1, us-west-1"):
        instance_provider().create(instance_props())
    assert api.instances == {}


@pytest.mark.parametrize("status", [429, 500, 503])
def test_launch_retries_refusals_without_a_second_instance(api, status):
    api.inject(Fault(status=status, count=2, method="POST", path_prefix="/api/v1/instance-operations/launch"))
    created = instance_provider().create(instance_props())
    assert list(api.instances) == [created.id]


def test_a_launch_whose_answer_was_lost_is_adopted_not_repeated(api):
    # the launch happens, its answer comes after the client gave up: the retry finds the instance by name
    api.inject(Fault(status=0, delay=2.6, method="POST", path_prefix="/api/v1/instance-operations/launch"))
    created = instance_provider().create(instance_props())
    assert list(api.instances) == [created.id] and launches(api) == 1


def test_the_launch_rate_limit_is_respected(api):
    api.launch_interval_s = 1.0
    provider = instance_provider(launch_interval_s=1.0)
    first = provider.create(instance_props(name="lorastack-a"))
    second = provider.create(instance_props(name="lorastack-b"))
    assert {first.id, second.id} == set(api.instances)  # spaced by the client: no 429 on the second


def test_the_api_key_stays_out_of_pickles_and_the_key_comes_from_the_environment(api, monkeypatch):
    provider = instance_provider()
    assert API_KEY.encode() not in base64.b64decode(serialize_provider(provider))
    monkeypatch.setenv("LAMBDA_API_KEY", API_KEY)
    assert hosted(InstanceProvider(**FAST), api_key=None).create(instance_props()).id in api.instances


def test_a_wrong_key_is_refused_with_the_vendors_code(api):
    with pytest.raises(LambdaError) as refused:
        LambdaClient("wrong", retries=0).list_instances()
    assert refused.value.status == 401 and refused.value.code == "global/invalid-api-key"


# --- the host inside the instance -----------------------------------------------------------------------------------


def test_the_instance_finds_itself_by_name_and_terminates_itself(api):
    created = instance_provider().create(instance_props())
    environ = {"LAMBDA_INSTANCE_NAME": "lorastack-test", "LAMBDA_API_KEY": API_KEY, "LAMBDA_API_BASE_URL": api.base_url}
    lines: list[str] = []
    host = host_from_environment(environ, lines.append)
    assert isinstance(host, LambdaHost)
    deadline = time.monotonic() + 5
    while api.instances[created.id].status != "active" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.machine_id == created.id and host.billed_usd_per_hour() == 0.75
    assert host.stop(retries=2, backoff_s=0.01)
    assert api.billing() == [] and created.id in lines[-1]
    assert LambdaHost(environ, lines.append).stop(retries=2, backoff_s=0.01)  # already gone: nothing to do
    assert all(API_KEY not in line for line in lines)


def test_the_user_data_starts_the_pinned_image_with_the_filesystem_as_workspace():
    env = {"LORASTACK_SPEC": '{"steps": 4, "dataset": {"source": "/workspace/d"}}', "LAMBDA_API_KEY": API_KEY}
    text = user_data.render("ghcr.io/lorastack/trainer:0.1.0", env, "lorastack-demo")
    container = read_user_data(text)
    assert container.image == "ghcr.io/lorastack/trainer:0.1.0" and container.env == env
    assert container.volumes == [("/lambda/nfs/lorastack-demo", "/workspace")] and container.restart_on_failure
    with pytest.raises(ValueError, match="line break"):
        user_data.render("ghcr.io/lorastack/trainer:0.1.0", {"X": "a\nb"}, None)
