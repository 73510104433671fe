"""A PodRuntime that runs pods for real: our trainer image becomes `python -m training` on this machine.

When the emulator starts a pod whose image is the trainer's, this runtime starts the trainer entrypoint as a
local process, the way RunPod starts the container:

- the pod's environment, plus what RunPod adds inside a pod: RUNPOD_POD_ID, a pod-scoped RUNPOD_API_KEY and
  RUNPOD_API_BASE_URL pointing back at this emulator, so the trainer stops its own pod through the API;
- a directory as the pod's volume: `<root>/volumes/<volume-id>` for a network volume (it outlives pods, as the
  real one does), `<root>/containers/<pod-id>` otherwise (gone with the pod). A process cannot be given a mount
  without privileges, so the mount path (/workspace) is rewritten to that directory in every environment value
  that names it (LORASTACK_WORKSPACE, HF_HOME, paths inside LORASTACK_SPEC): the one liberty taken;
- stdout and stderr become the pod's container log (GET /v2/pods/{id}/logs);
- an entrypoint that exits is started again while the pod is RUNNING (RunPod restarts exited containers);
  stop and terminate send SIGTERM, then SIGKILL after `stop_grace_s`, as `docker stop` does.

Billing: per second, per GPU type, at the catalog's price (infra/runpod_backend/catalog.py, the emulator's /v2/catalog/gpus),
from RUNNING until stopped or terminated, each billed stretch rounded up to a whole second. `bill(pod_id)`
keeps the figures after the pod is gone, so a test can read what a run cost.

Faults for tests (`PodFaults`), applied inside the trainer process by emulator/pod_process.py, which runs the
same `training` module after installing them: a per-volume disk quota that a test sets or lowers at any time
(`set_volume_quota`; ENOSPC when a checkpoint write takes the volume over it), a hang after step N (no more steps,
the process alive: a hung GPU as the watchdog sees it), and a probe line per completed step (so a test knows
exactly how far a killed trainer got).
Other images are only marked RUNNING, as the base PodRuntime does.

RunPod's S3 API (`volume_buckets`, emulator/volume_buckets.py): with it, each volume is also a bucket on a local
S3 server, created and deleted with the volume; a container's start copies in what was uploaded to the bucket
(a dataset `pulumi up` sent), its exit copies out what the pod wrote (for `make fetch` through S3).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from emulator.runpod import PodRuntime
from emulator.volume_buckets import VolumeBuckets
from infra.config import DEFAULT_REPOSITORY
from infra.paths import REPO_ROOT
from infra.runpod_backend import catalog

# Variables of this machine a container would also have; everything else comes from the pod's env.
HOST_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
ENV_FAULT_QUOTA_FILE = "LORASTACK_EMULATOR_QUOTA_FILE"
ENV_FAULT_VOLUME = "LORASTACK_EMULATOR_VOLUME_DIR"
ENV_FAULT_QUOTA_AS_TORCH = "LORASTACK_EMULATOR_QUOTA_AS_TORCH"  # "1": a full volume raises torch's RuntimeError
ENV_FAULT_HANG = "LORASTACK_EMULATOR_HANG_AFTER_STEP"
ENV_FAULT_PROBE = "LORASTACK_EMULATOR_PROBE"
PROBE_PREFIX = "emulator-probe: step "
SIGTERM_DELAY_S = 0.5


@dataclass
class PodFaults:
    volume_quotas: bool = False  # enforce `set_volume_quota` (checked at checkpoint writes)
    # a full volume raises what torch.save's C++ writer raises on a full disk (a RuntimeError, no errno)
    full_volume_as_torch: bool = False
    hang_after_step: int | None = None  # the trainer stops making steps after this one, process alive
    probe_steps: bool = False  # log `emulator-probe: step N` after every completed step

    @property
    def any(self) -> bool:
        return self.volume_quotas or self.hang_after_step is not None or self.probe_steps


@dataclass
class ContainerRun:
    """One start of a pod's container: the trainer process."""

    started: float
    ended: float | None = None
    exit_code: int | None = None

    def seconds(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started


@dataclass
class PodBill:
    pod_id: str
    name: str
    gpu_id: str
    gpu_count: int
    usd_per_hour: float
    closed_seconds: int = 0  # whole seconds of the stretches that have ended
    running_since: float | None = None
    containers: list[ContainerRun] = field(default_factory=list)

    def open(self, now: float) -> None:
        if self.running_since is None:
            self.running_since = now

    def close(self, now: float) -> None:
        if self.running_since is not None:
            self.closed_seconds += math.ceil(now - self.running_since)
            self.running_since = None

    def billed_seconds(self, now: float) -> int:
        running = math.ceil(now - self.running_since) if self.running_since is not None else 0
        return self.closed_seconds + running

    def cost_usd(self, now: float) -> float:
        return self.billed_seconds(now) * self.usd_per_hour / 3600

    @property
    def restarts(self) -> int:
        return max(len(self.containers) - 1, 0)


@dataclass
class _Container:
    process: subprocess.Popen
    generation: int
    run: ContainerRun
    done: threading.Event = field(default_factory=threading.Event)


class ProcessRuntime(PodRuntime):
    def __init__(
        self,
        root: Path,
        *,
        trainer_repositories: tuple[str, ...] = (DEFAULT_REPOSITORY,),
        python: str = sys.executable,
        stop_grace_s: float = 10.0,
        restart_delay_s: float = 1.0,
        extra_env: dict[str, str] | None = None,
        seed_volume: Callable[[Path], object] | None = None,  # what it returns is unused
        faults: PodFaults | None = None,
        clock: Callable[[], float] = time.monotonic,
        volume_buckets: VolumeBuckets | None = None,
    ):
        """`seed_volume(directory)` runs once when a volume's directory is first made: it stands in for the data
        a user puts on the volume before a run (the demo's tiny model and images). Set `base_url` (the emulator's
        own address) before the first pod starts."""
        self.root = Path(root)
        self.trainer_repositories = trainer_repositories
        self.python = python
        self.stop_grace_s = stop_grace_s
        self.restart_delay_s = restart_delay_s
        self.extra_env = dict(extra_env or {})
        self.seed_volume = seed_volume
        self.faults = faults or PodFaults()
        self.clock = clock
        self.volume_buckets = volume_buckets
        self.base_url: str | None = None
        self.bills: dict[str, PodBill] = {}
        self._containers: dict[str, _Container] = {}
        self._generation: dict[str, int] = {}
        self._lock = threading.RLock()

    # -- where things are -----------------------------------------------------------------------------------
    def volume_dir(self, volume_id: str) -> Path:
        return self.root / "volumes" / volume_id

    def container_dir(self, pod_id: str) -> Path:
        return self.root / "containers" / pod_id

    def workspace_of(self, pod: dict) -> tuple[str, Path]:
        """(mount path inside the pod, directory standing in for it)."""
        mounts = pod.get("mounts") or {}
        if mounts.get("network"):
            mount = mounts["network"][0]
            return mount["path"], self.volume_dir(mount["volumeId"])
        path = (mounts.get("persistent") or {}).get("path", "/workspace")
        return path, self.container_dir(pod["id"])

    def quota_file(self, directory: Path) -> Path:
        return self.root / "quotas" / directory.name

    def set_volume_quota(self, volume_id: str, size_bytes: int) -> None:
        """From now on the volume is full past `size_bytes` (read by the trainer at each checkpoint write)."""
        path = self.quota_file(self.volume_dir(volume_id))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(size_bytes))

    def on_volume_grown(self, volume_id: str, added_gb: int) -> None:
        """A grown volume has that much more room under a quota a test set."""
        path = self.quota_file(self.volume_dir(volume_id))
        if path.is_file():
            path.write_text(str(int(path.read_text()) + added_gb * 2**30))

    def is_trainer(self, image: str) -> bool:
        reference = image.split("@", 1)[0]  # without the digest
        if ":" in reference.rsplit("/", 1)[-1]:  # a tag, not a registry port
            reference = reference.rsplit(":", 1)[0]
        return reference in self.trainer_repositories

    # -- billing ----------------------------------------------------------------------------------------------
    def bill(self, pod_id: str) -> PodBill:
        with self._lock:
            return self.bills[pod_id]

    def billed_seconds(self, pod_id: str) -> int:
        with self._lock:
            return self.bills[pod_id].billed_seconds(self.clock())

    def cost_usd(self, pod_id: str) -> float:
        with self._lock:
            return self.bills[pod_id].cost_usd(self.clock())

    def total_cost_usd(self) -> float:
        with self._lock:
            now = self.clock()
            return sum(bill.cost_usd(now) for bill in self.bills.values())

    def billing_pods(self) -> list[str]:
        """Pods billed right now: after a clean run and destroy, none."""
        with self._lock:
            return [pod_id for pod_id, bill in self.bills.items() if bill.running_since is not None]

    def _open_bill(self, pod: dict) -> None:
        gpu = catalog.RUNPOD_GPUS[pod["gpu"]["id"]]
        price = gpu.secure_usd if pod["cloud"] == "SECURE" else gpu.community_usd
        with self._lock:
            bill = self.bills.get(pod["id"])
            if bill is None:
                bill = self.bills[pod["id"]] = PodBill(
                    pod["id"], pod["name"], gpu.id, pod["gpu"]["count"], (price or 0.0) * pod["gpu"]["count"]
                )
            bill.open(self.clock())

    def _close_bill(self, pod_id: str) -> None:
        with self._lock:
            if pod_id in self.bills:
                self.bills[pod_id].close(self.clock())

    # -- PodRuntime hooks -------------------------------------------------------------------------------------
    def on_start(self, pod: dict) -> None:
        previous = self._containers.get(pod["id"])
        if previous is not None:  # a restart: the old container is gone before the new one starts
            previous.done.wait(self.stop_grace_s + 5)
        self._open_bill(pod)
        self.api.set_status(pod["id"], "RUNNING")
        if self.is_trainer(pod["image"]):
            self._spawn(pod["id"])

    def on_stop(self, pod: dict) -> None:
        self._close_bill(pod["id"])
        self._end_container(pod["id"], graceful=True)

    def on_terminate(self, pod: dict) -> None:
        self._close_bill(pod["id"])
        self._end_container(pod["id"], graceful=True)
        if not (pod.get("mounts") or {}).get("network"):
            container = self._containers.get(pod["id"])
            if container is not None:
                container.done.wait(self.stop_grace_s + 5)
            shutil.rmtree(self.container_dir(pod["id"]), ignore_errors=True)  # a container disk dies with its pod

    # -- RunPod's S3 API (emulator/volume_buckets.py) ------------------------------------------------------------
    def on_volume_create(self, volume_id: str) -> None:
        if self.volume_buckets is not None:
            self.volume_buckets.create(volume_id)

    def on_volume_delete(self, volume_id: str) -> None:
        if self.volume_buckets is not None:
            self.volume_buckets.delete(volume_id)

    def _pull_uploads(self, pod: dict, directory: Path) -> None:
        """Before a container starts: what was uploaded to its network volume's bucket is on the volume."""
        network = (pod.get("mounts") or {}).get("network")
        if self.volume_buckets is not None and network:
            try:
                self.volume_buckets.pull(network[0]["volumeId"], directory)
            except Exception as error:  # the pod starts anyway and fails on what it misses
                self.api.append_log(pod["id"], f"emulator: copying the volume's bucket in failed: {error}", source="system")

    def _push_written(self, pod_id: str) -> None:
        """After a container exits: what it wrote on its network volume is in the volume's bucket."""
        with self.api.lock:
            record = self.api.pods.get(pod_id)
            volume_id = record.network_volume_id if record else None
        if self.volume_buckets is not None and volume_id and volume_id in self.api.volumes:
            try:
                self.volume_buckets.push(volume_id, self.volume_dir(volume_id))
            except Exception as error:  # e.g. the volume was deleted meanwhile; the pod is over
                self.api.append_log(pod_id, f"emulator: copying the volume out to its bucket failed: {error}", source="system")

    # -- what tests do to pods --------------------------------------------------------------------------------
    def kill_container(self, pod_id: str) -> None:
        """SIGKILL the trainer (an OOM kill, a segfault): the pod stays RUNNING and its container restarts."""
        container = self._containers.get(pod_id)
        if container is not None and container.process.poll() is None:
            os.killpg(container.process.pid, signal.SIGKILL)

    def lose_host(self, pod_id: str) -> list[str]:
        """The machine is gone (preemption, host failure): the trainer dies without a signal it could act on,
        and the pod with it. Returns the pod's log as it was when the trainer died."""
        with self._lock:
            self._generation[pod_id] = self._generation.get(pod_id, 0) + 1  # nothing restarts it
        container = self._containers.get(pod_id)
        if container is not None:
            if container.process.poll() is None:
                os.killpg(container.process.pid, signal.SIGKILL)
            container.done.wait(10)
        with self.api.lock:
            record = self.api.pods.get(pod_id)
            last_log = [line.line for line in record.logs] if record else []
        self.api.terminate(pod_id)
        return last_log

    def wait_until_stopped(self, pod_id: str, timeout: float) -> bool:
        """True once the pod is no longer RUNNING and its trainer process has ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.api.lock:
                pod = self.api.pods.get(pod_id)
                status = pod.status if pod else "TERMINATED"
            container = self._containers.get(pod_id)
            if status not in ("PROVISIONING", "STARTING", "RUNNING") and (container is None or container.done.is_set()):
                return True
            time.sleep(0.1)
        return False

    # -- the process ------------------------------------------------------------------------------------------
    def _environment(self, pod: dict) -> dict[str, str]:
        if not self.base_url:
            raise RuntimeError("ProcessRuntime.base_url is not set: the trainer could not reach the API to stop its pod")
        mount, directory = self.workspace_of(pod)
        fresh = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        if fresh and self.seed_volume is not None:
            self.seed_volume(directory)
        self._pull_uploads(pod, directory)
        mount_pattern = re.compile(r'(^|")' + re.escape(mount.rstrip("/")) + r'(?=/|"|$)')
        env = {name: os.environ[name] for name in HOST_VARIABLES if name in os.environ}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",  # the emulator is for machines without internet: a download fails at once
            "TOKENIZERS_PARALLELISM": "false",
        })
        env.update({name: mount_pattern.sub(lambda m: m.group(1) + str(directory), value) for name, value in pod["env"].items()})
        env.update({
            "RUNPOD_POD_ID": pod["id"],
            "RUNPOD_API_KEY": self.api.pod_api_key(pod["id"]),
            "RUNPOD_API_BASE_URL": self.base_url,
        })
        faults = self.faults
        if faults.volume_quotas:
            env[ENV_FAULT_QUOTA_FILE] = str(self.quota_file(directory))
            env[ENV_FAULT_VOLUME] = str(directory)
            if faults.full_volume_as_torch:
                env[ENV_FAULT_QUOTA_AS_TORCH] = "1"
        if faults.hang_after_step is not None:
            env[ENV_FAULT_HANG] = str(faults.hang_after_step)
        if faults.probe_steps:
            env[ENV_FAULT_PROBE] = "1"
        env.update(self.extra_env)
        return env

    def _spawn(self, pod_id: str) -> None:
        with self.api.lock:
            record = self.api.pods.get(pod_id)
            if record is None or record.status != "RUNNING":
                return
            pod = record.to_json()
        env = self._environment(pod)
        module = "emulator.pod_process" if self.faults.any else "training"
        process = subprocess.Popen(
            [self.python, "-m", module],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: stop reaches the trainer and its children
        )
        with self._lock:
            generation = self._generation.get(pod_id, 0) + 1
            self._generation[pod_id] = generation
            run = ContainerRun(self.clock())
            if pod_id in self.bills:
                self.bills[pod_id].containers.append(run)
            container = self._containers[pod_id] = _Container(process, generation, run)
        threading.Thread(target=self._follow, args=(pod_id, container), name=f"pod-{pod_id}", daemon=True).start()

    def _follow(self, pod_id: str, container: _Container) -> None:
        assert container.process.stdout is not None  # started with stdout=PIPE
        for line in container.process.stdout:
            self.api.append_log(pod_id, line.rstrip("\n"))
        code = container.process.wait()
        with self._lock:
            container.run.ended, container.run.exit_code = self.clock(), code
        self._push_written(pod_id)
        container.done.set()
        self.api.append_log(pod_id, f"container exited with code {code}", source="system")
        self._restart_if_running(pod_id, container.generation)

    def _restart_if_running(self, pod_id: str, generation: int) -> None:
        """RunPod restarts an entrypoint that exits while the pod is RUNNING."""
        time.sleep(self.restart_delay_s)
        with self._lock:
            if self._generation.get(pod_id) != generation:
                return  # stopped, replaced or lost meanwhile
        with self.api.lock:
            record = self.api.pods.get(pod_id)
            running = record is not None and record.status == "RUNNING"
        if running:
            self.api.append_log(pod_id, "restarting the container (the pod is still RUNNING)", source="system")
            self._spawn(pod_id)

    def _end_container(self, pod_id: str, graceful: bool) -> None:
        with self._lock:
            self._generation[pod_id] = self._generation.get(pod_id, 0) + 1  # no restart after this
            container = self._containers.get(pod_id)
        if container is None or container.process.poll() is not None:
            return

        def signal_group(signum: int) -> None:
            try:
                os.killpg(container.process.pid, signum)
            except ProcessLookupError:
                pass

        if not graceful:
            signal_group(signal.SIGKILL)
            return

        def stop() -> None:
            # A moment first: when the trainer stopped its own pod, its request gets its answer before SIGTERM.
            if container.done.wait(SIGTERM_DELAY_S):
                return
            signal_group(signal.SIGTERM)
            if not container.done.wait(self.stop_grace_s):
                signal_group(signal.SIGKILL)

        # not waited for here: the trainer itself may be the caller (its own stop request)
        threading.Thread(target=stop, name=f"stop-{pod_id}", daemon=True).start()

    def shutdown(self) -> None:
        """End every trainer process (the emulator is going away)."""
        for pod_id in list(self._containers):
            self._end_container(pod_id, graceful=False)
        for container in list(self._containers.values()):
            container.done.wait(10)
