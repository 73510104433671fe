"""Where the trainer runs, seen from inside: stop my machine, my billed rate, where my storage is.

The trainer (training/lifecycle.py) talks to a `Host` and knows no cloud. `host_from_environment` picks the
implementation from the variables the platform sets in the container: RUNPOD_POD_ID (with the pod-scoped
RUNPOD_API_KEY RunPod sets beside it) means a RunPod pod; LAMBDA_INSTANCE_NAME (ours: Lambda injects no id, so the
user data the instance boots with names it) means a Lambda Cloud instance; JOB_ID a Hugging Face Job;
CONTAINER_ID with CONTAINER_API_KEY a Vast.ai instance; anything else is a local run (a laptop, a test, the
emulator without pods), which has nothing to stop and no bill of its own. A new platform is one class here and
one line in `host_from_environment`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from cloudapi import lambda_rest
from cloudapi.checkpoint_mirror import HubCheckpointMirror
from cloudapi.run_mirror import bucket_mirror_from_environment
from cloudapi.runpod_rest import LIVE_POD_STATUSES, NotFound, RunpodClient, RunpodError
from cloudapi.vast_rest import VastClient, VastError
from contract.spec import ENV_CHECKPOINT_REPO, ENV_CHECKPOINT_REPO_PRIVATE
from contract.workspace import RunPaths, workspace_root

ENV_POD_ID = "RUNPOD_POD_ID"  # set by RunPod inside every pod
ENV_POD_API_KEY = "RUNPOD_API_KEY"  # pod-scoped key RunPod sets inside the pod
ENV_API_BASE_URL = "RUNPOD_API_BASE_URL"
ENV_LAMBDA_INSTANCE_NAME = "LAMBDA_INSTANCE_NAME"  # ours, written by the instance's user data (Lambda sets no id)
ENV_LAMBDA_API_KEY = "LAMBDA_API_KEY"  # the account key, a secret input of the instance's user data
ENV_HF_JOB_ID = "JOB_ID"  # set by Hugging Face Jobs inside every job
ENV_VAST_CONTAINER_ID = "CONTAINER_ID"  # set by Vast.ai inside every instance: the instance id
ENV_VAST_CONTAINER_API_KEY = "CONTAINER_API_KEY"  # Vast.ai's key for start/stop/destroy of this instance only
ENV_VAST_URL = "VAST_URL"

Log = Callable[[str], None]


class Host(Protocol):
    @property
    def machine_id(self) -> str:
        """This machine's id on its platform ("" for a local run): a new machine is a fresh start."""

    def stop(self, retries: int, backoff_s: float, keep_trying_s: float = 0.0) -> bool:
        """Stop the machine this process runs on; True when it is stopped (or there is none to stop). A machine
        that refuses (locked, busy) is asked again until `keep_trying_s` has passed."""

    def billed_usd_per_hour(self) -> float | None:
        """What the platform bills this machine per hour now; None when it bills nothing of its own; raises when
        the platform cannot be asked."""

    def storage_root(self) -> Path:
        """The root of the run's shared storage (the network volume on a pod)."""


class LocalHost:
    """A run on this machine: nothing to stop, no bill of its own; storage at LORASTACK_WORKSPACE or /workspace."""

    machine_id = ""

    def __init__(self, environ: Mapping[str, str], log: Log):
        self._environ, self._log = environ, log

    def stop(self, retries: int, backoff_s: float, keep_trying_s: float = 0.0) -> bool:
        self._log(f"{ENV_POD_ID} is not set (a local run): no pod to stop")
        return True

    def billed_usd_per_hour(self) -> float | None:
        return None

    def storage_root(self) -> Path:
        return workspace_root(dict(self._environ))


class RunpodHost:
    """A RunPod pod: it stops itself through the REST API with its pod-scoped key (a container that exits is
    restarted, so stopping the pod is the only way out), and reads its billed rate (`cost`) from the same API."""

    def __init__(self, environ: Mapping[str, str], log: Log):
        self.machine_id = environ[ENV_POD_ID]
        self._environ, self._log = environ, log

    def _client(self, retries: int, backoff_s: float) -> RunpodClient:
        return RunpodClient(self._environ.get(ENV_POD_API_KEY, ""), base_url=self._environ.get(ENV_API_BASE_URL) or None,
                            retries=retries, backoff=backoff_s)

    def stop(self, retries: int, backoff_s: float, keep_trying_s: float = 0.0) -> bool:
        """POST /v2/pods/{RUNPOD_POD_ID}/action {"action": "stop"}.

        A 409 is not proof of a stopped pod: RunPod answers it too for a pod that is locked or busy, which then
        restarts its container and bills on. So the pod's status decides: stopped when it no longer runs;
        otherwise the stop is asked again (waits doubling up to a minute) until `keep_trying_s` has passed."""
        pod_id = self.machine_id
        deadline = time.monotonic() + keep_trying_s
        refusals = 0
        while True:
            try:
                client = self._client(retries, backoff_s)
                client.pod_action(pod_id, "stop")
            except NotFound:
                self._log(f"pod {pod_id} is already terminated")
                return True
            except RunpodError as error:
                if error.status != 409:
                    self._log(f"could not stop pod {pod_id}: {error}")
                    return False
                status = self._status(client)
                if status is not None and status not in LIVE_POD_STATUSES:
                    self._log(f"pod {pod_id} is already stopped ({status})")
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    self._log(f"could not stop pod {pod_id}: it is {status or 'in an unknown state'} and refuses to "
                              f"stop ({error}); it bills until it is stopped (unlock it in the console) or the "
                              "reaper terminates it")
                    return False
                wait = min(backoff_s * 2**refusals, 60.0, left)
                if refusals == 0:
                    self._log(f"pod {pod_id} refused to stop while {status or 'in an unknown state'} ({error}); "
                              f"asking again for up to {keep_trying_s / 60:.0f} min")
                refusals += 1
                time.sleep(wait)
                continue
            except Exception as error:  # logged; the caller exits non-zero
                self._log(f"could not stop pod {pod_id}: {error}")
                return False
            self._log(f"stop requested for pod {pod_id}")
            return True

    def _status(self, client: RunpodClient) -> str | None:
        """The pod's status as the API reports it; TERMINATED when it is gone; None when it cannot be read."""
        try:
            return client.get_pod(self.machine_id).get("status")
        except NotFound:
            return "TERMINATED"
        except Exception as error:  # not knowing is not proof of a stop
            self._log(f"could not read pod {self.machine_id}'s status: {error}")
            return None

    def billed_usd_per_hour(self) -> float | None:
        """`cost` of GET /v2/pods/{id}; None when it is not positive (not billed, or not said)."""
        billed = float(self._client(retries=2, backoff_s=0.5).get_pod(self.machine_id).get("cost") or 0)
        return billed if billed > 0 else None

    def storage_root(self) -> Path:
        return workspace_root(dict(self._environ))


class LambdaHost:
    """A Lambda Cloud instance. Lambda has no stop state and bills until terminate, and it tells an instance neither
    its id nor a scoped key: the launch gives the instance a unique name (`lorastack-<stack>`) and the user data
    passes that name and the account's API key (a secret input) into the container. The host finds its own id by
    listing instances with that name, then terminates itself."""

    def __init__(self, environ: Mapping[str, str], log: Log):
        self.name = environ[ENV_LAMBDA_INSTANCE_NAME]
        self._environ, self._log = environ, log
        self._instance: dict | None = None

    def _client(self, retries: int, backoff_s: float) -> lambda_rest.LambdaClient:
        return lambda_rest.LambdaClient(self._environ.get(ENV_LAMBDA_API_KEY, ""), base_url=self._environ.get(
            lambda_rest.BASE_URL_ENV) or None, retries=retries, backoff=backoff_s)

    def _find_self(self, client: lambda_rest.LambdaClient) -> dict | None:
        if self._instance is None:
            self._instance = next((instance for instance in client.list_instances() if instance.get("name") == self.name
                                   and instance["status"] not in lambda_rest.GONE_STATUSES), None)
        return self._instance

    @property
    def machine_id(self) -> str:
        """The instance id (a relaunched instance under the same name is a new machine); the name when the API
        cannot be asked."""
        try:
            instance = self._find_self(self._client(retries=2, backoff_s=0.5))
        except (lambda_rest.LambdaError, ValueError) as error:
            self._log(f"could not look up instance {self.name}: {error}")
            return self.name
        return instance["id"] if instance else self.name

    def stop(self, retries: int, backoff_s: float, keep_trying_s: float = 0.0) -> bool:
        """POST /api/v1/instance-operations/terminate {"instance_ids": [own id]}: the only way to end billing.
        Lambda has no state that refuses a terminate, so there is nothing to keep trying (`keep_trying_s` unused)."""
        try:
            client = self._client(retries, backoff_s)
            instance = self._find_self(client)
            if instance is None:
                self._log(f"instance {self.name} is already terminated")
                return True
            client.terminate([instance["id"]])
        except lambda_rest.NotFound:
            self._log(f"instance {self.name} is already terminated")
            return True
        except Exception as error:  # logged; the caller exits non-zero
            self._log(f"could not terminate instance {self.name}: {error}")
            return False
        self._log(f"terminate requested for instance {instance['id']} ({self.name})")
        return True

    def billed_usd_per_hour(self) -> float | None:
        """The instance type's price_cents_per_hour, as GET /api/v1/instances reports it for this instance."""
        instance = self._find_self(self._client(retries=2, backoff_s=0.5))
        cents = (instance or {}).get("instance_type", {}).get("price_cents_per_hour") or 0
        return cents / 100 if cents > 0 else None

    def storage_root(self) -> Path:
        return workspace_root(dict(self._environ))


class HfJobHost:
    """A Hugging Face Job (JOB_ID is set in every job): the job ends, and its billing with it, when this process
    exits, so there is nothing to stop; its disk dies with it, so checkpoints also go to the checkpoint mirror
    (cloudapi/checkpoint_mirror.py). The job cannot read its own price: the stack's rate stands."""

    def __init__(self, environ: Mapping[str, str], log: Log):
        self.machine_id = environ[ENV_HF_JOB_ID]
        self._environ, self._log = environ, log

    def stop(self, retries: int, backoff_s: float, keep_trying_s: float = 0.0) -> bool:
        self._log(f"job {self.machine_id} ends when the trainer exits")
        return True

    def billed_usd_per_hour(self) -> float | None:
        return None

    def storage_root(self) -> Path:
        return workspace_root(dict(self._environ))


class VastHost:
    """A Vast.ai instance: it destroys itself when done (a stopped instance keeps billing its disk, and an exited
    container bills it too), with the per-instance CONTAINER_API_KEY. That key may only start, stop or destroy,
    so the billed rate is not read: the limits count at the stack's price ceiling, which the offer is within."""

    def __init__(self, environ: Mapping[str, str], log: Log):
        self.machine_id = environ[ENV_VAST_CONTAINER_ID]
        self._environ, self._log = environ, log

    def stop(self, retries: int, backoff_s: float, keep_trying_s: float = 0.0) -> bool:
        """DELETE /api/v0/instances/{CONTAINER_ID}/ with Bearer CONTAINER_API_KEY."""
        instance_id = self.machine_id
        try:
            client = VastClient(self._environ.get(ENV_VAST_CONTAINER_API_KEY, ""),
                                base_url=self._environ.get(ENV_VAST_URL) or None, retries=retries, backoff=backoff_s)
            client.destroy_instance(instance_id)  # an instance already gone counts as destroyed
        except (VastError, ValueError) as error:
            self._log(f"could not destroy instance {instance_id}: {error}")
            return False
        self._log(f"destroy requested for instance {instance_id}")
        return True

    def billed_usd_per_hour(self) -> float | None:
        return None

    def storage_root(self) -> Path:
        return workspace_root(dict(self._environ))


def host_from_environment(environ: Mapping[str, str], log: Log) -> Host:
    """The host this process runs on, from the variables its platform sets; `log` receives what it has to say."""
    if environ.get(ENV_POD_ID):
        return RunpodHost(environ, log)
    if environ.get(ENV_LAMBDA_INSTANCE_NAME):
        return LambdaHost(environ, log)
    if environ.get(ENV_HF_JOB_ID):
        return HfJobHost(environ, log)
    if environ.get(ENV_VAST_CONTAINER_ID) and environ.get(ENV_VAST_CONTAINER_API_KEY):
        return VastHost(environ, log)
    return LocalHost(environ, log)


class Mirror(Protocol):
    """Storage that outlives a machine whose disk dies with it: a Hub repo (a Hugging Face Job,
    cloudapi/checkpoint_mirror.py) or an S3-compatible bucket (Vast.ai, cloudapi/run_mirror.py), laid out as the
    run's directory under the storage root. Each method raises when the mirror cannot be reached."""

    def where(self, paths: RunPaths) -> str:
        """Where the run is mirrored, in words for the log."""

    def push_checkpoint(self, paths: RunPaths, directory: Path) -> None:
        """One complete checkpoint, as soon as it is written."""

    def push_results(self, paths: RunPaths) -> int:
        """The run's directory but its checkpoints (LoRA, samples, status, history, DONE), before the machine stops;
        how many files."""

    def restore(self, paths: RunPaths, log: Log) -> None:
        """A fresh machine: bring the newest complete checkpoint (and the run's files) unless its disk has them."""


def mirror_from_environment(environ: Mapping[str, str]) -> Mirror | None:
    """The machine's mirror: the Hub repo LORASTACK_CHECKPOINT_REPO (written with HF_TOKEN), or the bucket
    LORASTACK_MIRROR_URL; None when the stack sets neither (its storage outlives the machine already)."""
    repo_id = environ.get(ENV_CHECKPOINT_REPO)
    if repo_id:
        private = environ.get(ENV_CHECKPOINT_REPO_PRIVATE, "1") != "0"
        return HubCheckpointMirror(repo_id, environ.get("HF_TOKEN"), private, environ.get("HF_ENDPOINT") or None)
    return bucket_mirror_from_environment(environ)
