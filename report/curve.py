"""The loss curve: raw and smoothed loss per step over the learning rate, checkpoints and restarts marked."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from contract.history import History
from contract.workspace import atomic_write_bytes

FIGURE_INCHES = (10.0, 6.0)
DPI = 100  # 1000 x 600 px
RAW_COLOUR, SMOOTH_COLOUR, LR_COLOUR = "#9db4d6", "#1f4e9c", "#2e8b57"
CHECKPOINT_COLOUR, RESUME_COLOUR = "#888888", "#d9480f"


def smoothing_factor(count: int) -> float:
    """EMA weight of the past: an averaging window of about a twentieth of the run, between 2 and 100 steps."""
    span = min(max(count / 20, 2.0), 100.0)
    return 1.0 - 2.0 / (span + 1.0)


def ema(values: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (the first points are not pulled toward zero)."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = beta * average + (1.0 - beta) * value
        smoothed.append(average / (1.0 - beta**count))
    return smoothed


def render_loss_curve(history: History, target: Path) -> Path:
    """Write the curve as a PNG of FIGURE_INCHES x DPI pixels at `target`."""
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # Agg, set on this figure alone: no pyplot, no display, no global backend
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    steps = [record.step for record in history.steps]
    losses = [record.loss for record in history.steps]
    marker = "o" if len(steps) <= 30 else None  # a short run's few points stay visible
    loss_axes.plot(steps, losses, color=RAW_COLOUR, linewidth=1, marker=marker, markersize=3, label="loss")
    beta = smoothing_factor(len(losses))
    loss_axes.plot(steps, ema(losses, beta), color=SMOOTH_COLOUR, linewidth=2, label=f"smoothed (EMA {beta:.2f})")
    lr_axes.plot(steps, [record.lr for record in history.steps], color=LR_COLOUR, linewidth=1.5)

    for axes in (loss_axes, lr_axes):
        for number, step in enumerate(history.checkpoints):
            axes.axvline(step, color=CHECKPOINT_COLOUR, linestyle=":", linewidth=1,
                         label="checkpoint" if number == 0 and axes is loss_axes else None)  # fmt: skip
        for number, step in enumerate(history.resumes):
            axes.axvline(step, color=RESUME_COLOUR, linestyle="--", linewidth=1.5,
                         label="resumed" if number == 0 and axes is loss_axes else None)  # fmt: skip
        axes.grid(True, alpha=0.3)
    loss_axes.set_title(f"training loss, {len(steps)} steps")
    loss_axes.set_ylabel("loss")
    loss_axes.legend(loc="best")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.5 on a short run
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(target, buffer.getvalue())
    return target
