"""Where the trainer runs, seen from inside: stop my machine, my billed rate, where my storage is.

The trainer (training/lifecycle.py) talks to a `Host` and knows no cloud. `host_from_environment` picks the
implementation from the variables the platform sets in the container: RUNPOD_POD_ID (with the pod-scoped
RUNPOD_API_KEY RunPod sets beside it) means a RunPod pod; CONTAINER_ID with CONTAINER_API_KEY a Vast.ai
instance; anything else is a local run (a laptop, a test, the
emulator without pods), which has nothing to stop and no bill of its own. A new platform is one class here and
one line in `host_from_environment`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from cloudapi.run_mirror import RunMirror, mirror_from_environment  # noqa: F401 - the trainer's durable storage
from cloudapi.runpod_rest import NotFound, RunpodClient, RunpodError
from cloudapi.vast_rest import VastClient, VastError
from contract.workspace import workspace_root

ENV_POD_ID = "RUNPOD_POD_ID"  # set by RunPod inside every pod
ENV_POD_API_KEY = "RUNPOD_API_KEY"  # pod-scoped key RunPod sets inside the pod
ENV_API_BASE_URL = "RUNPOD_API_BASE_URL"
ENV_VAST_CONTAINER_ID = "CONTAINER_ID"  # set by Vast.ai inside every instance: the instance id
ENV_VAST_CONTAINER_API_KEY = "CONTAINER_API_KEY"  # Vast.ai's key for start/stop/destroy of this instance only
ENV_VAST_URL = "VAST_URL"

Log = Callable[[str], None]


class Host(Protocol):
    machine_id: str  # this machine's id on its platform ("" for a local run): a new machine is a fresh start

    def stop(self, retries: int, backoff_s: float) -> bool:
        """Stop the machine this process runs on; True when it is stopped (or there is none to stop)."""

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

    def stop(self, retries: int, backoff_s: float) -> bool:
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

    def stop(self, retries: int, backoff_s: float) -> bool:
        """POST /v2/pods/{RUNPOD_POD_ID}/action {"action": "stop"}."""
        pod_id = self.machine_id
        try:
            self._client(retries, backoff_s).pod_action(pod_id, "stop")
        except NotFound:
            self._log(f"pod {pod_id} is already terminated")
            return True
        except RunpodError as error:
            if error.status != 409:  # 409: not stoppable because it is stopped already (SIGTERM came from a stop)
                self._log(f"could not stop pod {pod_id}: {error}")
                return False
            self._log(f"pod {pod_id} is already stopped")
            return True
        except Exception as error:  # noqa: BLE001 - logged; the caller exits non-zero
            self._log(f"could not stop pod {pod_id}: {error}")
            return False
        self._log(f"stop requested for pod {pod_id}")
        return True

    def billed_usd_per_hour(self) -> float | None:
        """`cost` of GET /v2/pods/{id}; None when it is not positive (not billed, or not said)."""
        billed = float(self._client(retries=2, backoff_s=0.5).get_pod(self.machine_id).get("cost") or 0)
        return billed if billed > 0 else None

    def storage_root(self) -> Path:
        return workspace_root(dict(self._environ))


class VastHost:
    """A Vast.ai instance: it destroys itself when done (a stopped instance keeps billing its disk, and an exited
    container bills it too), with the per-instance CONTAINER_API_KEY. That key may only start, stop or destroy,
    so the billed rate is not read: the limits count at the stack's price ceiling, which the offer is within."""

    def __init__(self, environ: Mapping[str, str], log: Log):
        self.machine_id = environ[ENV_VAST_CONTAINER_ID]
        self._environ, self._log = environ, log

    def stop(self, retries: int, backoff_s: float) -> bool:
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
    if environ.get(ENV_VAST_CONTAINER_ID) and environ.get(ENV_VAST_CONTAINER_API_KEY):
        return VastHost(environ, log)
    return LocalHost(environ, log)
