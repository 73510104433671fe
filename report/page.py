"""report.html: one page per run, written next to the run's files and opened from disk (no server).

`render_report(folder, facts)` reads a local copy of a run, as the volume holds it (runs/<id>/) or as
`make fetch` lays it out in outputs/<stack>/:

    history.jsonl, samples/ (contract/history.py), status.json (optional)
    lora/*.safetensors and lora/README.md, or the same files in the folder itself

and writes into the same folder grid-step-XXXXXX.png per sample step, loss.png, report.html, and adds
the newest grid to the model card. Every link in the page is relative and nothing is fetched from
elsewhere (no CSS, scripts or fonts from the network): the folder can be zipped, moved or attached.
"""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from contract.history import HISTORY_FILE, SAMPLES_DIR, read_history, read_samples
from contract.workspace import atomic_write_bytes
from report.curve import ema, render_loss_curve, smoothing_factor
from report.facts import RunFacts, complete_facts, lora_files, lora_folder
from report.grid import render_grid

REPORT_FILE = "report.html"
LOSS_CURVE_FILE = "loss.png"
MODEL_CARD_FILE = "README.md"
CARD_GRID_FILE = "samples.png"  # the newest grid's copy next to a model card kept in another folder
_CARD_SECTION = re.compile(r"\n*<!-- lorastack:samples -->.*?<!-- /lorastack:samples -->\n?", re.DOTALL)


def grid_file(step: int) -> str:
    return f"grid-step-{step:06d}.png"


def format_seconds(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def add_grid_to_model_card(card: Path, grid: Path, step: int) -> None:
    """Show `grid` in the model card (a Markdown image link in a section of its own, replaced on every render).

    The link is relative to the card; a grid in another folder is copied next to it (as samples.png), so
    the LoRA folder stays whole when it is uploaded or moved on its own.
    """
    if grid.parent.resolve() != card.parent.resolve():
        shutil.copyfile(grid, card.parent / CARD_GRID_FILE)
        grid = card.parent / CARD_GRID_FILE
    section = (
        "\n\n<!-- lorastack:samples -->\n"
        f"## Samples at step {step}\n\n"
        f"![Samples at step {step}, one column per prompt]({grid.name})\n"
        "<!-- /lorastack:samples -->\n"
    )
    text = _CARD_SECTION.sub("", card.read_text(encoding="utf-8")).rstrip("\n")
    atomic_write_bytes(card, (text + section).encode())


def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("report", "templates"),
        autoescape=select_autoescape(default=True),
        undefined=StrictUndefined,  # a misspelt name in the template fails the render, not the page
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_report(folder: Path, facts: RunFacts | None = None) -> Path:
    """Render the run copy in `folder` (grids, loss curve, model card image, report.html); returns report.html.

    `facts`: what the caller knows (stack, backend, GPU, billed cost, ...); the rest comes from the folder.
    """
    folder = Path(folder)
    facts = complete_facts(facts or RunFacts(), folder)
    history = read_history(folder / HISTORY_FILE)
    sample_steps = read_samples(folder / SAMPLES_DIR)

    grids = [(entry, render_grid(entry, folder / grid_file(entry.step))) for entry in sample_steps]
    curve = render_loss_curve(history, folder / LOSS_CURVE_FILE) if history.steps else None
    card = lora_folder(folder) / MODEL_CARD_FILE
    if grids and card.is_file():
        newest, newest_grid = grids[-1]
        add_grid_to_model_card(card, newest_grid, newest.step)

    losses = [record.loss for record in history.steps]
    page = _environment().get_template("report.html").render(
        facts=facts,
        title=facts.stack or facts.run_id or folder.name,
        wall_time=format_seconds(facts.wall_seconds),
        loss_last=losses[-1] if losses else None,
        loss_smoothed=ema(losses, smoothing_factor(len(losses)))[-1] if losses else None,
        history=history,
        curve=curve.name if curve else None,
        grids=[
            {"step": entry.step, "file": path.name, "prompts": [image.prompt for image in entry.images]}
            for entry, path in reversed(grids)  # newest first: the pictures the LoRA is judged by
        ],
        lora_files=[{"name": p.relative_to(folder).as_posix(), "size": _size(p)} for p in lora_files(folder)],
        card=card.relative_to(folder).as_posix() if card.is_file() else None,
        rendered_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    target = folder / REPORT_FILE
    atomic_write_bytes(target, page.encode())
    return target
