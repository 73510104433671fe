"""The run's life on a pod: limits, SIGTERM, a stall watchdog, the DONE marker, and stopping the pod.

A RunPod container whose entrypoint exits is restarted, so a pod never stops by itself: every way out of a
run (success, failure, a limit, a stall) stops the pod through RunPod's API, and a run that is already DONE
does not train again when the container comes back (`already_done`). When stopping fails even after the
client's retries, the process exits non-zero and the reaper, outside, catches the pod.

Time and money are counted from this process's start: a restarted container counts again, and the pod's
total is the reaper's to enforce.

    with Lifecycle(limits, paths) as life:          # SIGTERM handler + watchdog; failure -> status + stop
        for step in ...:
            ...
            life.beat(step)
            if life.stop_requested.is_set():        # SIGTERM or a limit: checkpoint and leave
                break
        life.finish("succeeded" or "limit" ...)     # DONE on success, then the pod stops
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping

from infra.runpod.client import RunpodClient
from training.spec import RunLimits
from training.tracking import redact, update_status, utc_now
from training.workspace import RunPaths, atomic_write_json

ENV_POD_ID = "RUNPOD_POD_ID"  # set by RunPod inside every pod
ENV_POD_API_KEY = "RUNPOD_API_KEY"  # pod-scoped key RunPod sets inside the pod
ENV_API_BASE_URL = "RUNPOD_API_BASE_URL"
EXIT_STOP_FAILED = 3  # the pod may still be running: the reaper must act
EXIT_STALLED = 4


def already_done(paths: RunPaths) -> bool:
    """True when this run finished before: a restarted container must not train it again."""
    return paths.done.exists()


class Lifecycle:
    def __init__(
        self,
        limits: RunLimits,
        paths: RunPaths,
        environ: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_failure: Callable[[BaseException], None] | None = None,
        exit_process: Callable[[int], None] = os._exit,
        stop_retries: int = 6,
        stop_backoff_s: float = 0.5,
    ):
        self.limits, self.paths, self.environ, self.clock = limits, paths, environ, clock
        self.stop_requested = threading.Event()
        self.reason: str | None = None
        self._on_failure = on_failure  # e.g. reporter.finish("failed", ...); else status.json is written here
        self._exit_process = exit_process  # the watchdog's way out of a hung process (injectable for tests)
        self._stop_retries, self._stop_backoff_s = stop_retries, stop_backoff_s
        self._started = clock()
        self._last_beat = self._started
        self._last_step: int | None = None
        self._finished = threading.Event()
        self._pod_stop_lock = threading.Lock()
        self._pod_stop_result: bool | None = None
        self._previous_sigterm = None
        self._watchdog: threading.Thread | None = None

    # -- setup ----------------------------------------------------------------------------------------------
    def start(self) -> Lifecycle:
        """Install the SIGTERM handler (main thread only) and start the stall watchdog."""
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._watchdog = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def __enter__(self) -> Lifecycle:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._finished.is_set():  # finish() ran (its SystemExit, if any, must not turn into "failed")
            return False
        if exc is not None:
            self._record_failure(exc)
            self.finish("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        elif not self._finished.is_set():
            self._log("left the run without finish(): stopping the pod")
            self.finish("interrupted")
        return False  # the exception, if any, goes on

    # -- during the run -------------------------------------------------------------------------------------
    def beat(self, step: int) -> None:
        """After every step: liveness for the watchdog, then the time and money limits."""
        now = self.clock()
        self._last_beat, self._last_step = now, step
        hours = (now - self._started) / 3600
        if hours >= self.limits.max_hours:
            self.request_stop(f"time limit: {hours:.2f} h reached (maxHours {self.limits.max_hours:g})")
        elif self.limits.usd_per_hour > 0:
            cost = hours * self.limits.usd_per_hour
            if cost >= self.limits.max_cost_usd:
                self.request_stop(
                    f"money limit: ${cost:.2f} spent at ${self.limits.usd_per_hour:g}/h "
                    f"(maxCostUsd {self.limits.max_cost_usd:g})"
                )

    def request_stop(self, reason: str) -> None:
        """Ask the training loop to checkpoint and leave; the first reason is kept."""
        if not self.stop_requested.is_set():
            self.reason = reason
            self.stop_requested.set()
            self._log(f"stop requested: {reason}")

    def _on_sigterm(self, signum, frame) -> None:
        self.request_stop("interrupted: SIGTERM (the pod is being stopped or replaced)")

    # -- the end --------------------------------------------------------------------------------------------
    def finish(self, state: str) -> None:
        """Write DONE on success, then stop the pod. Exits non-zero when the pod could not be stopped."""
        self._finished.set()
        if state == "succeeded":
            atomic_write_json(self.paths.done, {"state": state, "finished_at": utc_now(), "step": self._last_step})
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if not self.stop_pod():
            raise SystemExit(EXIT_STOP_FAILED)

    def stop_pod(self) -> bool:
        """POST /v2/pods/{RUNPOD_POD_ID}/action {"action": "stop"}, once; True when stopped or not on a pod."""
        with self._pod_stop_lock:
            if self._pod_stop_result is None:
                self._pod_stop_result = self._send_stop()
            return self._pod_stop_result

    def _send_stop(self) -> bool:
        pod_id = self.environ.get(ENV_POD_ID)
        if not pod_id:
            self._log(f"{ENV_POD_ID} is not set (a local run): no pod to stop")
            return True
        try:
            client = RunpodClient(
                self.environ.get(ENV_POD_API_KEY, ""),
                base_url=self.environ.get(ENV_API_BASE_URL) or None,
                retries=self._stop_retries,
                backoff=self._stop_backoff_s,
            )
            client.pod_action(pod_id, "stop")
        except Exception as error:  # noqa: BLE001 - logged; the caller exits non-zero
            self._log(f"could not stop pod {pod_id}: {error}")
            return False
        self._log(f"stop requested for pod {pod_id}")
        return True

    def _record_failure(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        self._log("failed: " + "".join(traceback.format_exception(exc)).rstrip())
        try:
            if self._on_failure is not None:
                self._on_failure(exc)
            else:
                update_status(self.paths, {"state": "failed", "message": message}, self.environ)
        except Exception as error:  # noqa: BLE001 - the pod must still be stopped
            self._log(f"could not record the failure in status.json: {error}")

    # -- watchdog -------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        stall_seconds = self.limits.stall_minutes * 60
        poll = min(30.0, max(stall_seconds / 4, 0.05))
        while not self._finished.wait(poll):
            silent = self.clock() - self._last_beat
            if silent < stall_seconds:
                continue
            # The main thread may be hung inside CUDA or I/O: this thread reports, stops the pod, and exits.
            step = "before the first step" if self._last_step is None else f"after step {self._last_step}"
            message = f"stalled: no progress for {silent / 60:.1f} min {step} (stallMinutes {self.limits.stall_minutes:g})"
            self._log(message)
            try:
                update_status(self.paths, {"state": "stalled", "message": message}, self.environ)
            except Exception as error:  # noqa: BLE001 - stopping the pod matters more
                self._log(f"could not write status.json: {error}")
            stopped = self.stop_pod()
            self._finished.set()
            self._exit_process(EXIT_STALLED if stopped else EXIT_STOP_FAILED)
            return

    def _log(self, line: str) -> None:
        print(f"lifecycle: {redact(line, self.environ)}", file=sys.stderr, flush=True)
