"""Secrets kept out of what is written down: a dataset URL's credentials reach the pod only as a secret
variable (never its spec, the state in plain text, the LoRA metadata or the model card), and a traceback the
trainer does not catch is printed through redact() like every other line."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

from pulumi.runtime import rpc

from contract.redaction import redacted_source
from contract.spec import ENV_DATASET_SOURCE, TrainSpec
from infra.stack_files import parse_stack
from tests.test_program import API_KEY, POD_TYPE, RUNPOD_STACKS, Mocks, no_keys_from_the_environment, run  # noqa: F401 - fixtures
from training.__main__ import with_dataset_credentials

ROOT = Path(__file__).resolve().parent.parent
SIGNED = ("https://alice:s3cr3t-pass@data.example.com/sets/style.zip"
          "?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f0")
PLAIN = "https://data.example.com/sets/style.zip"


def test_redacted_source_drops_user_password_and_signed_query():
    assert redacted_source(SIGNED) == PLAIN
    assert redacted_source("owner/dataset") == "owner/dataset" and redacted_source("/data/set") == "/data/set"


def test_dataset_credentials_reach_the_pod_only_as_a_secret_variable():
    raw = copy.deepcopy(RUNPOD_STACKS["sdxl-4090"])
    raw["lorastack:train"]["dataset"] = {"source": SIGNED}
    monitor, outputs = run("sdxl-4090", raw, {"runpodApiKey": API_KEY})  # no token: only the URL makes it secret
    (pod,) = monitor.of_type(POD_TYPE)
    assert rpc.is_rpc_secret(pod.inputs["env"])  # the state keeps the env encrypted
    env = rpc.unwrap_rpc_secret(pod.inputs["env"])
    spec = TrainSpec.model_validate_json(env["LORASTACK_SPEC"])
    assert spec.dataset.source == PLAIN and "s3cr3t" not in env["LORASTACK_SPEC"]
    assert env[ENV_DATASET_SOURCE] == SIGNED
    # the trainer trains from the whole URL; a fresh signature is the same run
    assert with_dataset_credentials(spec, env).dataset.source == SIGNED
    resigned = parse_stack({**raw, "lorastack:train": {**raw["lorastack:train"], "dataset": {"source": PLAIN + "?sig=new"}}},
                           "sdxl-4090")
    assert resigned.train.fingerprint() == spec.fingerprint() == outputs["runId"].rsplit("-", 1)[1]


def test_a_url_without_credentials_travels_in_the_plain_spec():
    raw = copy.deepcopy(RUNPOD_STACKS["sdxl-4090"])
    raw["lorastack:train"]["dataset"] = {"source": PLAIN}
    monitor, _ = run("sdxl-4090", raw, {"runpodApiKey": API_KEY})
    (pod,) = monitor.of_type(POD_TYPE)
    assert not rpc.is_rpc_secret(pod.inputs["env"]) and ENV_DATASET_SOURCE not in pod.inputs["env"]


def test_an_uncaught_traceback_is_redacted_in_the_log():
    # a crash outside the Lifecycle (here in a thread and in the main thread) prints through the trainer's hooks
    token = "hf_never_in_the_log_0123456789"
    script = (
        "import os, threading\n"
        "from training.__main__ import install_redacting_excepthooks\n"
        "install_redacting_excepthooks(os.environ)\n"
        "def leak(): raise RuntimeError('login failed for ' + os.environ['HF_TOKEN'])\n"
        "thread = threading.Thread(target=leak); thread.start(); thread.join()\n"
        "leak()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"HF_TOKEN": token, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr.count("RuntimeError: login failed for ***") == 2, result.stderr
    assert token not in result.stderr and "Exception in thread" in result.stderr
