"""Progress of a run: lines in the pod's log, status.json on the volume, and W&B when configured.

Each update prints a line for people and a JSON record for machines (`contract.progress`: its one writer
and reader; `make status` reads the newest record from the pod's log when the volume is not mounted).

status.json (paths.status) is what `make status` and the reaper read; every write replaces it atomically:

    state                  running | succeeded | failed | limit | stalled | interrupted
    step, total            optimizer steps done / planned
    loss, lr               mean loss since the previous update, current learning rate
    seconds_per_step       recent throughput (a moving window, not the run average)
    eta_seconds            seconds to the last step at that throughput
    cost_usd               GPU cost of this process so far (limits.usd_per_hour x elapsed)
    estimated_cost_usd     cost so far plus the ETA's cost
    usd_per_hour, run_id, started_at, updated_at (UTC ISO 8601), message, outputs

Secrets never reach stdout or status.json: every message passes through `redact`.
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from contract import history
from contract.progress import format_duration, progress_record
from contract.spec import RunLimits, TrainSpec
from contract.workspace import RunPaths, atomic_write_json, read_json

TERMINAL_STATES = ("succeeded", "failed", "limit", "stalled", "interrupted")
ENV_WANDB_API_KEY = "WANDB_API_KEY"
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSPHRASE|CREDENTIAL)", re.IGNORECASE)
_SHORTEST_SECRET = 6  # shorter values ("1", "true") are not secrets, and redacting them would garble text


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace the value of every secret-looking environment variable (…_KEY, …_TOKEN, …) with ***."""
    environ = os.environ if environ is None else environ
    secrets = sorted(
        (value for name, value in environ.items() if _SECRET_NAME.search(name) and len(value) >= _SHORTEST_SECRET),
        key=len,
        reverse=True,  # longest first: a secret that contains another is replaced whole
    )
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def update_status(paths: RunPaths, fields: dict, environ: Mapping[str, str] | None = None) -> dict:
    """Merge `fields` into status.json and replace it atomically; returns what was written."""
    status = read_json(paths.status) or {}
    status.update(fields)
    if isinstance(status.get("message"), str):
        status["message"] = redact(status["message"], environ)
    status["updated_at"] = utc_now()
    atomic_write_json(paths.status, status)
    return status


class Reporter:
    """Called by the training loop: `step()` after every optimizer step, `samples()` after sampling,
    `finish()` once. Prints at most every `progress_every_s` seconds (and at the first and last step)."""

    def __init__(
        self,
        paths: RunPaths,
        spec: TrainSpec,
        limits: RunLimits,
        run_id: str,
        total_steps: int,
        start_step: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        out: TextIO | None = None,
        environ: Mapping[str, str] | None = None,
        progress_every_s: float = 10.0,
        window: int = 20,
    ):
        self.paths, self.spec, self.limits, self.run_id = paths, spec, limits, run_id
        self.total_steps, self.start_step = total_steps, start_step
        self._clock = clock
        self._out = out
        self._environ = os.environ if environ is None else environ
        self._progress_every_s = progress_every_s
        self._started = clock()
        self._recent: deque[tuple[int, float]] = deque([(start_step, self._started)], maxlen=window + 1)
        self._losses: list[float] = []
        self._last_report = float("-inf")
        self._step, self._lr = start_step, 0.0
        self._wandb = start_wandb(spec, paths, run_id, self._environ)
        update_status(
            paths,
            {
                "state": "running",
                "run_id": run_id,
                "step": start_step,
                "total": total_steps,
                "started_at": utc_now(),
                "usd_per_hour": limits.usd_per_hour,
                "message": f"resuming at step {start_step}" if start_step else "training",
                "outputs": None,
            },
            self._environ,
        )

    # -- numbers ------------------------------------------------------------------------------------------
    @property
    def seconds_per_step(self) -> float | None:
        (first_step, first_time), (last_step, last_time) = self._recent[0], self._recent[-1]
        return (last_time - first_time) / (last_step - first_step) if last_step > first_step else None

    @property
    def cost_usd(self) -> float:
        return self.limits.usd_per_hour * (self._clock() - self._started) / 3600

    def eta_seconds(self) -> float | None:
        per_step = self.seconds_per_step
        return None if per_step is None else per_step * max(self.total_steps - self._step, 0)

    # -- events -------------------------------------------------------------------------------------------
    def step(self, step: int, loss: float, lr: float) -> None:
        now = self._clock()
        self._step, self._lr = step, lr
        self._recent.append((step, now))
        self._losses.append(float(loss))
        history.record_step(self.paths.run, step, loss, lr)
        if self._wandb is not None:
            per_step = self.seconds_per_step
            self._wandb.log(
                {"loss": float(loss), "lr": lr, **({"seconds_per_step": per_step} if per_step else {})}, step=step
            )
        due = now - self._last_report >= self._progress_every_s
        if due or step >= self.total_steps or step == self.start_step + 1:
            self._report(now)

    def _report(self, now: float) -> None:
        loss = sum(self._losses) / len(self._losses) if self._losses else None
        self._losses.clear()
        self._last_report = now
        per_step, eta = self.seconds_per_step, self.eta_seconds()
        cost = self.cost_usd
        estimated = cost + (eta or 0) / 3600 * self.limits.usd_per_hour
        parts = [f"step {self._step}/{self.total_steps}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts.append(f"lr {self._lr:.1e}")
        if per_step is not None and eta is not None:  # both known from the second step on
            parts += [f"{per_step:.2f} s/step", f"ETA {format_duration(eta)}"]
        parts.append(f"cost ${cost:.2f} (est. ${estimated:.2f})")
        self._print(" ".join(parts))
        fields = {
            "loss": loss,
            "lr": self._lr,
            "seconds_per_step": per_step,
            "eta_seconds": None if eta is None else round(eta, 1),
            "cost_usd": round(cost, 4),
            "estimated_cost_usd": round(estimated, 4),
        }
        self._print(progress_record("running", self._step, self.total_steps, **fields))
        update_status(
            self.paths, {"state": "running", "step": self._step, "total": self.total_steps, **fields}, self._environ
        )

    def samples(self, step: int, images: list, prompts: list[str]) -> list[Path]:
        """Save sample images (PIL) under runs/<id>/samples/ and log them to W&B with their prompts."""
        saved = save_sample_images(self.paths, step, images, prompts)
        folder = self.paths.run / history.SAMPLES_DIR
        if self._wandb is not None:
            import wandb

            captions = list(prompts) + [""] * (len(images) - len(prompts))
            self._wandb.log(
                {"samples": [wandb.Image(image, caption=caption) for image, caption in zip(images, captions, strict=False)]},
                step=step,
            )
        self._print(f"samples at step {step}: {len(saved)} images in {folder}")
        return saved

    def finish(self, state: str, message: str, outputs: dict | None = None) -> dict:
        if state not in TERMINAL_STATES:
            raise ValueError(f"state must be one of {TERMINAL_STATES} (got {state!r})")
        now = self._clock()
        outputs_json = {key: str(value) for key, value in (outputs or {}).items()}
        status = update_status(
            self.paths,
            {
                "state": state,
                "step": self._step,
                "total": self.total_steps,
                "eta_seconds": 0 if state == "succeeded" else None,
                "cost_usd": round(self.cost_usd, 4),
                "message": message,
                "outputs": {key: redact(value, self._environ) for key, value in outputs_json.items()},
            },
            self._environ,
        )
        self._print(
            f"{state}: {status['message']} (step {self._step}/{self.total_steps}, "
            f"{format_duration(now - self._started)}, cost ${self.cost_usd:.2f})"
        )
        self._print(progress_record(state, self._step, self.total_steps, cost_usd=status["cost_usd"]))
        if self._wandb is not None:
            self._wandb.summary.update({"state": state, "final_step": self._step})
            self._wandb.finish(exit_code=0 if state == "succeeded" else 1)
            self._wandb = None
        return status

    def _print(self, line: str) -> None:
        print(redact(line, self._environ), file=self._out or sys.stdout, flush=True)


def save_sample_images(paths: RunPaths, step: int, images: list, prompts: list[str]) -> list[Path]:
    """Sample images (PIL) as PNGs in the layout contract/history.py defines (all steps kept, prompts indexed)."""
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return history.save_samples(paths.run, step, prompts, pngs)


def start_wandb(spec: TrainSpec, paths: RunPaths, run_id: str, environ: Mapping[str, str]):
    """A W&B run when the spec names a project: online with WANDB_API_KEY, else offline on the volume, where wandb
    writes it under its own `wandb/` folder in `dir`: runs/<id>/wandb/wandb/offline-run-<time>-<id>/, uploaded later
    by `wandb sync` of that folder (the log says which). None when no project is set."""
    if not spec.wandb_project:
        return None
    import wandb

    online = bool(environ.get(ENV_WANDB_API_KEY))
    folder = paths.run / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=spec.wandb_project,
        name=run_id,
        id=re.sub(r"[^A-Za-z0-9_-]", "-", run_id)[:64],  # the same id on a restarted pod: one W&B run
        resume="allow",
        dir=str(folder),
        mode="online" if online else "offline",
        config=spec.model_dump(mode="json", by_alias=True),
        settings=wandb.Settings(console="off"),  # keep wandb off stdout: the pod log is ours
    )
    if not online:
        print(f"W&B is offline ({ENV_WANDB_API_KEY} is not set): upload this run later with "
              f"`wandb sync {wandb_offline_runs(paths)}`", flush=True)
    return run


def wandb_offline_runs(paths: RunPaths) -> str:
    """Where an offline run lands: wandb writes `wandb/offline-run-<time>-<id>/` inside the `dir` it is given."""
    return f"{paths.run / 'wandb' / 'wandb'}/offline-run-*"
