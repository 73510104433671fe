"""`python -m training`: the pod's entrypoint. Read the spec, train (resuming), export, report, stop the pod.

Everything comes from the environment infra sets: LORASTACK_SPEC(_FILE), LORASTACK_LIMITS,
LORASTACK_RUN_ID and LORASTACK_WORKSPACE. A bad spec exits 2 with one line per problem, before any
model is loaded. With several GPUs the process re-executes itself under `accelerate launch`, one process
per GPU. Exit codes: 0 trained (or already done), 2 bad configuration, 75 stopped early with a checkpoint
(SIGTERM or a limit: a new pod resumes), anything else a failure.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import traceback
from collections.abc import Mapping

from pydantic import ValidationError

from contract.redaction import redacted_source
from contract.spec import (
    ENV_DATASET_SOURCE,
    ENV_LIMITS,
    ENV_RUN_ID,
    RunLimits,
    SpecError,
    TrainSpec,
    describe_errors,
    spec_from_environment,
)
from contract.workspace import RunPaths

EXIT_CONFIG = 2
EXIT_STOPPED = 75  # EX_TEMPFAIL: not finished, resumable


def limits_from_environment(environ: Mapping[str, str]) -> RunLimits:
    raw = environ.get(ENV_LIMITS)
    if not raw:
        raise SpecError([f"${ENV_LIMITS} is not set: every pod needs its time and money limits (JSON)"])
    try:
        return RunLimits.model_validate_json(raw)
    except ValidationError as error:
        raise SpecError(describe_errors(error, f"${ENV_LIMITS}", "")) from None


def read_configuration(environ: Mapping[str, str]) -> tuple[TrainSpec, RunLimits, str]:
    """The spec, the limits and the run id, every problem reported at once as SpecError lines."""
    problems, spec, limits = [], None, None
    try:
        spec = spec_from_environment(dict(environ))
    except SpecError as error:
        problems += error.problems
    except OSError as error:
        problems.append(f"cannot read the spec file: {error}")
    try:
        limits = limits_from_environment(environ)
    except SpecError as error:
        problems += error.problems
    run_id = environ.get(ENV_RUN_ID, "")
    if not run_id:
        problems.append(f"${ENV_RUN_ID} is not set: the run's directory on the volume is named by it")
    if problems:
        raise SpecError(problems)
    assert spec is not None and limits is not None  # each is set, or its problem was raised above
    return spec, limits, run_id


def with_dataset_credentials(spec: TrainSpec, environ: Mapping[str, str]) -> TrainSpec:
    """The spec to train with: its dataset source with the credentials infra sent apart (ENV_DATASET_SOURCE),
    when that URL is the one the spec names. Everything written down keeps the spec as it came."""
    full = environ.get(ENV_DATASET_SOURCE)
    if not full or redacted_source(full) != spec.dataset.source:
        return spec
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"source": full})})


def install_redacting_excepthooks(environ: Mapping[str, str]) -> None:
    """Uncaught errors, in any thread, print their traceback through redact() like every other line: the
    default hooks would print the raw values (a token in a URL, an env value in a message) into the pod log."""
    from training.tracking import redact

    def print_redacted(header: str, exc_type, exc, tb) -> None:
        text = header + "".join(traceback.format_exception(exc_type, exc, tb))
        print(redact(text, environ), end="", file=sys.stderr, flush=True)

    def main_thread(exc_type, exc, tb) -> None:
        print_redacted("", exc_type, exc, tb)

    def other_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        print_redacted(f"Exception in thread {name}:\n", args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = main_thread
    threading.excepthook = other_thread


def _launched_processes() -> int:
    """GPUs to spread over when this process is not yet one of several launched by accelerate."""
    if "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        return 1
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def relaunch_with_accelerate(processes: int) -> None:
    """Replace this process with `accelerate launch`: one copy of this entrypoint per GPU."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--module", "training",
    ]  # fmt: skip
    print(f"{processes} GPUs: relaunching as {' '.join(command[1:])}", flush=True)
    os.execv(sys.executable, command)


def run(spec: TrainSpec, limits: RunLimits, paths: RunPaths, run_id: str, environ: Mapping[str, str]) -> int:
    """Train `spec` (its dataset source may carry credentials: only the data loading sees them; the status,
    trackers, LoRA metadata and model card get the spec as the environment held it)."""
    recorded = spec
    spec = with_dataset_credentials(spec, environ)
    # The hub libraries read HF_HOME when imported: set it before anything imports them.
    os.environ["HF_HOME"] = str(paths.hf_home)
    from training import checkpoints
    from training.export import export_trained
    from training.lifecycle import Lifecycle, describe_failure, process_age_seconds
    from training.loop import make_accelerator, train
    from training.tracking import Reporter, update_status

    accelerator = make_accelerator(spec)
    if not accelerator.is_main_process:
        return _run_follower(spec, paths, accelerator)

    reporter: Reporter | None = None

    def record_failure(error: BaseException) -> None:
        message = describe_failure(error, paths)
        if reporter is not None:
            reporter.finish("failed", message)
        else:
            update_status(paths, {"state": "failed", "message": message}, environ)

    with Lifecycle(limits, paths, environ, on_failure=record_failure, process_age_s=process_age_seconds()) as life:
        reporter = Reporter(
            paths, recorded, limits, run_id, spec.steps, checkpoints.latest_step(paths), environ=environ
        )

        def on_step(step: int, loss: float, lr: float) -> None:
            reporter.step(step, loss, lr)
            life.beat(step)

        result = train(
            spec, paths, on_step=on_step, on_samples=reporter.samples, stop=life.stop_requested, accelerator=accelerator
        )
        if result.outcome == "stopped":
            reason = life.reason or "stop requested"
            state = "interrupted" if reason.startswith("interrupted") else "limit"
            reporter.finish(state, f"{reason}; stopped at step {result.step} with a checkpoint to resume from")
            life.finish(state)
            return EXIT_STOPPED
        outputs = export_trained(dataclasses.replace(result.state, spec=recorded), environ=dict(environ))
        reporter.finish("succeeded", f"trained {result.step} steps", outputs)
        life.finish("succeeded")
    return 0


def _run_follower(spec: TrainSpec, paths: RunPaths, accelerator) -> int:
    """A non-main GPU process: trains its share; the main process reports, exports and stops the pod."""
    import threading

    from training.loop import train

    stop = threading.Event()
    # SIGTERM reaches every process; this one only passes the request on (the loop agrees on it every step).
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    result = train(with_dataset_credentials(spec, os.environ), paths, stop=stop, accelerator=accelerator)
    return EXIT_STOPPED if result.outcome == "stopped" else 0


def main(environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    install_redacting_excepthooks(environ)
    from training.lifecycle import host

    storage = host(environ).storage_root()  # where the run's directory lives (the volume on a pod)
    try:
        spec, limits, run_id = read_configuration(environ)
    except SpecError as error:
        print("lorastack: the training configuration is invalid:", file=sys.stderr)
        for line in error.problems:
            print(f"  {line}", file=sys.stderr)
        # RunPod would restart the container into the same error forever: record it and stop the pod
        from training.lifecycle import fail_before_start

        named = environ.get(ENV_RUN_ID)
        fail_before_start(error.problems, RunPaths(storage, named) if named else None, environ)
        return EXIT_CONFIG
    paths = RunPaths(storage, run_id)
    from training.lifecycle import restore_from_mirror

    restore_from_mirror(paths, environ)  # a new machine resumes from storage that outlived the last one
    if paths.done.exists():
        print(f"run {run_id} already finished ({paths.done} exists): nothing to train", flush=True)
        # The container came back after the run (RunPod restarts an exited entrypoint): stop the pod again.
        from training.lifecycle import EXIT_STOP_FAILED, stop_own_pod

        return 0 if stop_own_pod(environ) else EXIT_STOP_FAILED
    processes = _launched_processes()
    if processes > 1:
        relaunch_with_accelerate(processes)
    from training.lifecycle import with_billed_rate

    return run(spec, with_billed_rate(limits, environ), paths, run_id, environ)


if __name__ == "__main__":
    raise SystemExit(main())
