"""The run's life on a pod: limits, SIGTERM, a stall watchdog, the DONE marker, and stopping the pod.

A RunPod container whose entrypoint exits is restarted, so a pod never stops by itself: every way out of a
run (success, failure, a limit, a stall) stops the machine through its host (cloudapi.hosts: stop myself, my
billed rate, where my storage is; chosen from the environment, RunPod or local), and a run that is already DONE
does not train again when the container comes back (`already_done`). When stopping fails even after the
host's retries, the process exits non-zero and the reaper, outside, catches the pod.

Time and money count the run's whole life, not this process's: RunPod restarts an exited container and a
lost pod is replaced by a new one on the same volume, and neither may reset the limits. The run's ledger lives
in its status.json on the volume (`life`): seconds run by every earlier process of this run, the number of
starts, and the first start. It is written every LEDGER_FLUSH_S seconds and at the end, so a process killed
outright (preemption, OOM kill) loses at most that much of its count; time outside the trainer (image pull,
provisioning) is not seen here and is the reaper's to catch, from the API's own startedAt and price.

The stall watchdog arms at the first training step: before it (model download, dataset preparation, feature
caching) only the longer setup allowance applies (limits.setupMinutes, default 60), so a slow first
download is not taken for a hung GPU. A container that keeps dying before any step (a hard crash the process
cannot report) is given up after MAX_STARTS_WITHOUT_PROGRESS starts on the same pod: failed, pod stopped.

    with Lifecycle(limits, paths) as life:          # SIGTERM handler + watchdog; failure -> status + stop
        for step in ...:
            ...
            life.beat(step)
            if life.stop_requested.is_set():        # SIGTERM or a limit: checkpoint and leave
                break
        life.finish("succeeded" or "limit" ...)     # DONE on success, then the pod stops
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, Literal

from cloudapi.hosts import Host, host_from_environment, mirror_from_environment
from contract.spec import RunLimits
from contract.workspace import RunPaths, atomic_write_json, read_json
from training.tracking import redact, update_status, utc_now

EXIT_STOP_FAILED = 3  # the pod may still be running: the reaper must act
EXIT_STALLED = 4
EXIT_CRASH_LOOP = 5
LEDGER_FLUSH_S = 10.0  # how often the run's ledger reaches the volume while training
MAX_STARTS_WITHOUT_PROGRESS = 3
LEDGER_KEY = "life"
# how long a pod that refuses its stop (locked, busy) is asked again, at least: beyond the run's own time limit
# if need be, since exiting instead would only restart the container into another billed run
STOP_PATIENCE_S = 600.0


def already_done(paths: RunPaths) -> bool:
    """True when this run finished before: a restarted container must not train it again."""
    return paths.done.exists()


def process_age_seconds() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere): imports count toward the limits too."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime_file:
            fields = stat.read().rsplit(")", 1)[1].split()
            uptime = float(uptime_file.read().split()[0])
        started_ticks = int(fields[19])  # field 22 of stat, counted after the ")" that ends the command name
        return max(uptime - started_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


# How a full volume surfaces: an OSError from Python's own writes, or, from torch.save's C++ writer, a
# RuntimeError whose text is all that is left of the errno.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXTS = ("no space left on device", "disk quota exceeded", "pytorchstreamwriter failed writing file",
                  "file write failed", "unexpected pos")


def is_volume_full(error: BaseException) -> bool:
    """True when `error`, or an error it came from, means the disk is out of space, however it surfaced."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_SPACE_ERRNOS:
            return True
        if isinstance(current, (OSError, RuntimeError)) and any(text in str(current).lower() for text in NO_SPACE_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def describe_failure(error: BaseException, paths: RunPaths) -> str:
    """One line for status.json and the log; a full volume says what survived and what to do."""
    if is_volume_full(error):
        from training.checkpoints import latest_step  # torch: only the trainer reaches this

        newest = latest_step(paths)
        kept = f"the newest complete checkpoint, step-{newest}, is intact" if newest else "no checkpoint was complete yet"
        where = getattr(error, "filename", None) or "a file"
        return (
            f"the network volume is full ({type(error).__name__}: {str(error)[:200]}) while writing {where}; "
            f"{kept}. Grow runpod.volume.sizeGb in the stack file (volumes only grow) and run `pulumi up`: the pod "
            "starts again and the run resumes"
        )
    return f"{type(error).__name__}: {error}"


def fail_before_start(problems: list[str], paths: RunPaths | None, environ: Mapping[str, str]) -> bool:
    """A configuration the trainer refuses: record it (when the run's directory is known) and stop the pod,
    which RunPod would otherwise restart into the same error forever. True when the pod is stopped."""
    message = "invalid training configuration: " + "; ".join(problems)
    if paths is not None:
        try:
            update_status(paths, {"state": "failed", "message": message}, environ)
        except OSError as error:
            _log(f"could not write status.json: {error}", environ)
        push_to_mirror(paths, environ)  # the reason outlives a machine that destroys itself
    return stop_own_pod(environ)


def host(environ: Mapping[str, str]) -> Host:
    """The machine this trainer runs on, its messages in the trainer's log (secrets redacted)."""
    return host_from_environment(environ, lambda line: _log(line, environ))


def stop_own_pod(environ: Mapping[str, str], retries: int = 6, backoff_s: float = 0.5,
                 keep_trying_s: float = STOP_PATIENCE_S) -> bool:
    """Stop the machine this trainer runs on; True when stopped or not on one (a local run). A pod that refuses
    the stop is asked again for `keep_trying_s`."""
    return host(environ).stop(retries, backoff_s, keep_trying_s)


def restore_from_mirror(paths: RunPaths, environ: Mapping[str, str]) -> None:
    """Where the machine's disk dies with it (cloudapi.hosts.Mirror): bring the run's newest checkpoint and files.
    A mirror that cannot be reached costs the resume, not the run: training starts from what this disk has."""
    try:
        mirror = mirror_from_environment(environ)
        if mirror is not None:
            mirror.restore(paths, lambda line: _log(line, environ))
    except Exception as error:
        _log(f"could not restore from the mirror, so this run starts from what this disk has: {error}", environ)


def push_to_mirror(paths: RunPaths, environ: Mapping[str, str]) -> bool:
    """Upload the run's results to its mirror, if it has one; False when that failed (then the machine is kept
    where it can be: its disk holds the only copy of the result)."""
    try:
        mirror = mirror_from_environment(environ)
        if mirror is None:
            return True
        count = mirror.push_results(paths)
    except Exception as error:  # logged; the caller keeps the machine
        _log(f"could not mirror the run's files, so the machine is kept for them: {error}", environ)
        return False
    _log(f"mirrored {count} run files to {mirror.where(paths)}", environ)
    return True


def with_billed_rate(limits: RunLimits, environ: Mapping[str, str]) -> RunLimits:
    """The limits with the rate the platform bills this machine at (RunPod: `cost` of GET /v2/pods/{id}), when
    it can be read.

    Infra fills usdPerHour from its dated price table; the pod's own `cost` is what is actually billed, so a
    price change since the stack was written does not make the money limit count short.
    """
    machine = host(environ)
    try:
        billed = machine.billed_usd_per_hour()
    except Exception as error:  # the table's rate still applies; say why the live one did not
        _log(f"could not read pod {machine.machine_id}'s billed rate, using ${limits.usd_per_hour:g}/h: {error}",
             environ)
        return limits
    if billed is None:
        return limits
    if abs(billed - limits.usd_per_hour) > 1e-9:
        _log(f"pod {machine.machine_id} is billed ${billed:g}/h (the stack estimated ${limits.usd_per_hour:g}/h): "
             "limits use it", environ)
    return limits.model_copy(update={"usd_per_hour": billed})


def _log(line: str, environ: Mapping[str, str]) -> None:
    print(f"lifecycle: {redact(line, environ)}", file=sys.stderr, flush=True)


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
        process_age_s: float = 0.0,
    ):
        """`process_age_s`: how long this process ran before the Lifecycle was made (imports), counted too."""
        self.limits, self.paths, self.environ, self.clock = limits, paths, environ, clock
        self.stop_requested = threading.Event()
        self.reason: str | None = None
        self._on_failure = on_failure  # e.g. reporter.finish("failed", ...); else status.json is written here
        self._exit_process = exit_process  # the watchdog's way out of a hung process (injectable for tests)
        self._stop_retries, self._stop_backoff_s = stop_retries, stop_backoff_s
        self.setup_seconds = max(limits.setup_minutes * 60, limits.stall_minutes * 60)
        self._started = clock() - process_age_s
        self._last_beat = self._started
        self._last_step: int | None = None
        ledger = (read_json(paths.status) or {}).get(LEDGER_KEY) or {}
        self._ledger = dict(ledger)
        self.seconds_before = float(ledger.get("seconds", 0.0))  # earlier processes of this run
        self._last_flush = float("-inf")
        self._finished = threading.Event()
        self._pod_stop_lock = threading.Lock()
        self._pod_stop_result: bool | None = None
        self._previous_sigterm: Callable[[int, FrameType | None], Any] | int | None = None  # as signal.signal returns
        self._watchdog: threading.Thread | None = None

    # -- setup ----------------------------------------------------------------------------------------------
    def start(self) -> Lifecycle:
        """Count this start in the run's ledger, install the SIGTERM handler (main thread only) and start the
        stall watchdog. Gives up (failed, pod stopped, exit EXIT_CRASH_LOOP) on a container that keeps dying."""
        pod_id = host(self.environ).machine_id
        same_pod = self._ledger.get("pod_id") == pod_id  # a new pod (a fix, a replacement) gets fresh tries
        barren = int(self._ledger.get("starts_without_progress", 0)) if same_pod else 0
        self._ledger.update(
            first_started_at=self._ledger.get("first_started_at") or utc_now(),
            starts=int(self._ledger.get("starts", 0)) + 1,
            starts_without_progress=barren + 1,
            pod_id=pod_id,
        )
        self._flush_ledger()
        if barren >= MAX_STARTS_WITHOUT_PROGRESS:
            message = (f"gave up: the trainer started {barren} times on this pod without reaching a training step "
                       "(see the pod log for the crash)")
            self._log(message)
            self._finished.set()
            update_status(self.paths, {"state": "failed", "message": message}, self.environ)
            self.stop_pod()
            raise SystemExit(EXIT_CRASH_LOOP)
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._watchdog = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def __enter__(self) -> Lifecycle:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
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
        first = self._last_step is None
        self._last_beat, self._last_step = now, step
        if first:
            self._ledger["starts_without_progress"] = 0
        if first or now - self._last_flush >= LEDGER_FLUSH_S:
            self._flush_ledger()
        hours = self.run_seconds() / 3600
        if hours >= self.limits.max_hours:
            self.request_stop(f"time limit: {hours:.2f} h reached (maxHours {self.limits.max_hours:g})")
        elif self.limits.usd_per_hour > 0:
            cost = hours * self.limits.usd_per_hour
            if cost >= self.limits.max_cost_usd:
                self.request_stop(
                    f"money limit: ${cost:.2f} spent at ${self.limits.usd_per_hour:g}/h "
                    f"(maxCostUsd {self.limits.max_cost_usd:g})"
                )

    def run_seconds(self) -> float:
        """The run's time so far: every earlier process of this run plus this one."""
        return self.seconds_before + self.clock() - self._started

    def _flush_ledger(self) -> None:
        self._last_flush = self.clock()
        self._ledger["seconds"] = round(self.run_seconds(), 3)
        self._ledger["cost_usd"] = round(self._ledger["seconds"] / 3600 * self.limits.usd_per_hour, 6)
        try:
            update_status(self.paths, {LEDGER_KEY: dict(self._ledger)}, self.environ)
        except OSError as error:  # a full volume must not hide the error that matters
            self._log(f"could not record the run's time in status.json: {error}")

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
        self._flush_ledger()
        if state == "succeeded":
            atomic_write_json(self.paths.done, {"state": state, "finished_at": utc_now(), "step": self._last_step})
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if not self.stop_pod():
            raise SystemExit(EXIT_STOP_FAILED)

    def stop_pod(self) -> bool:
        """Stop the machine (cloudapi.hosts), once; True when stopped or not on one."""
        with self._pod_stop_lock:
            if self._pod_stop_result is None:
                self._pod_stop_result = self._send_stop()
            return self._pod_stop_result

    def _send_stop(self) -> bool:
        if not push_to_mirror(self.paths, self.environ):
            return False
        # a pod that refuses the stop is asked again for what is left of the run's time limit (at least
        # STOP_PATIENCE_S): the limits are what the stack agreed to pay for
        left = self.limits.max_hours * 3600 - self.run_seconds()
        return stop_own_pod(self.environ, self._stop_retries, self._stop_backoff_s, max(left, STOP_PATIENCE_S))

    def _record_failure(self, exc: BaseException) -> None:
        message = describe_failure(exc, self.paths)
        self._log("failed: " + "".join(traceback.format_exception(exc)).rstrip())
        try:
            if self._on_failure is not None:
                self._on_failure(exc)
            else:
                update_status(self.paths, {"state": "failed", "message": message}, self.environ)
        except Exception as error:  # the pod must still be stopped
            self._log(f"could not record the failure in status.json: {error}")

    # -- watchdog -------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        stall_seconds = self.limits.stall_minutes * 60
        poll = min(30.0, max(stall_seconds / 4, 0.05))
        while not self._finished.wait(poll):
            silent = self.clock() - self._last_beat
            allowed = self.setup_seconds if self._last_step is None else stall_seconds
            if silent < allowed:
                continue
            # The main thread may be hung inside CUDA or I/O: this thread reports, stops the pod, and exits.
            if self._last_step is None:
                message = (f"stalled: no training step after {silent / 60:.1f} min of setup "
                           f"(setup allowance {self.setup_seconds / 60:g} min, limits.setupMinutes)")
            else:
                message = (f"stalled: no progress for {silent / 60:.1f} min after step {self._last_step} "
                           f"(stallMinutes {self.limits.stall_minutes:g})")
            self._log(message)
            try:
                self._flush_ledger()
                update_status(self.paths, {"state": "stalled", "message": message}, self.environ)
            except Exception as error:  # stopping the pod matters more
                self._log(f"could not write status.json: {error}")
            stopped = self.stop_pod()
            self._finished.set()
            self._exit_process(EXIT_STALLED if stopped else EXIT_STOP_FAILED)
            return

    def _log(self, line: str) -> None:
        _log(line, self.environ)
