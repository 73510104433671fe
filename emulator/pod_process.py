"""`python -m emulator.pod_process`: the trainer entrypoint with the emulator's test faults installed.

ProcessRuntime runs this instead of `python -m training` only when a test asks for a fault (PodFaults); it
installs the faults in this process, then runs the `training` module as `__main__`, unchanged:

- LORASTACK_EMULATOR_QUOTA_FILE (with LORASTACK_EMULATOR_VOLUME_DIR): a file holding the volume's size in bytes,
  read at every check (no file: no limit), so a test can fill the volume mid-run. After every checkpoint
  file write (safetensors and torch.save, the bulk of what a run writes), when the volume directory holds more
  than this, the file just written is removed and the write fails with ENOSPC, as a write to a full disk does.
  Simulated: small writes (status.json, the DONE marker) and caches are not checked; a real full volume would
  fail them too.
- LORASTACK_EMULATOR_HANG_AFTER_STEP=N: after step N the training step blocks forever with the process alive
  (a hung GPU kernel as the watchdog sees it: no step, no exit).
- LORASTACK_EMULATOR_PROBE=1: `emulator-probe: step N` on stdout after every completed step, so a test knows
  exactly how far a trainer got before it was killed.
"""

from __future__ import annotations

import errno
import os
import runpy
import threading
from pathlib import Path

from emulator.pods import (
    ENV_FAULT_HANG,
    ENV_FAULT_PROBE,
    ENV_FAULT_QUOTA_AS_TORCH,
    ENV_FAULT_QUOTA_FILE,
    ENV_FAULT_VOLUME,
    PROBE_PREFIX,
)


def _used_bytes(directory: Path) -> int:
    total = 0
    for folder, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                pass  # renamed or removed while walking
    return total


def _quota(quota_file: Path) -> int | None:
    try:
        return int(quota_file.read_text())
    except (FileNotFoundError, ValueError):
        return None


def install_quota(quota_file: Path, volume: Path) -> None:
    import torch

    from training import checkpoints

    def checked(write):
        def wrapper(obj, target, *args, **kwargs):
            result = write(obj, target, *args, **kwargs)
            quota = _quota(quota_file)
            if quota is not None and isinstance(target, (str, os.PathLike)) and _used_bytes(volume) > quota:
                Path(target).unlink(missing_ok=True)
                if os.environ.get(ENV_FAULT_QUOTA_AS_TORCH) == "1":  # torch.save's words for a full disk
                    raise RuntimeError("[enforce fail at inline_container.cc:659] . PytorchStreamWriter failed "
                                       f"writing file data/0: file write failed ({target})")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
            return result

        return wrapper

    checkpoints.save_file = checked(checkpoints.save_file)
    torch.save = checked(torch.save)


def install_step_hooks(hang_after: int | None, probe: bool) -> None:
    from training import loop

    train_step = loop.train_step

    def instrumented(state, micro_batches):
        if hang_after is not None and state.step >= hang_after:
            print(f"emulator fault: hanging after step {state.step}", flush=True)
            threading.Event().wait()  # forever: only the watchdog (or a stop) ends this process
        loss = train_step(state, micro_batches)
        if probe:
            print(f"{PROBE_PREFIX}{state.step}", flush=True)
        return loss

    loop.train_step = instrumented


def main() -> None:
    if os.environ.get(ENV_FAULT_QUOTA_FILE):
        install_quota(Path(os.environ[ENV_FAULT_QUOTA_FILE]), Path(os.environ[ENV_FAULT_VOLUME]))
    hang = os.environ.get(ENV_FAULT_HANG)
    probe = os.environ.get(ENV_FAULT_PROBE) == "1"
    if hang or probe:
        install_step_hooks(int(hang) if hang else None, probe)
    runpy.run_module("training", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
