"""`make cost STACK=name` (`python -m infra.cost [--markdown] [STACK ...]`): what a run will cost, before it runs.

One row per stack: provider, GPU or SKU, $/hour, seconds per step, steps, expected duration and total,
with the price source and its date. Each backend fetches its live prices (`Backend.live_prices`: RunPod's GPU
catalog `GET /v2/catalog/gpus` when RUNPOD_API_KEY is set and the API answers within a few seconds;
Replicate's `GET /v1/hardware`, which lists SKUs but no prices, confirms the SKU is still offered), otherwise
the dated table in its catalog (infra/<backend>_backend/catalog.py) is used; every row says which. The figures
are `StackConfig.cost_estimate(live)`: the same numbers the stack exports as outputs.

`--markdown` prints the same table for a pull-request comment. A stack whose estimate exceeds
limits.maxCostUsd or limits.maxHours gets a warning: its pod would be stopped before the last step.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from infra import backends, pricing
from infra.config import StackConfig
from infra.paths import STACKS_DIR
from infra.stack_files import StackError, load_stack

LIVE_TIMEOUT_S = 5.0  # a cost estimate must not hang on a slow API: the dated table is a fine answer


@dataclass(frozen=True)
class LivePrices:
    by_provider: dict[str, Any]  # provider -> its backend's live data (None where not fetched)
    notes: list[str]  # one line per source: what was used and why


@dataclass(frozen=True)
class CostRow:
    stack: str
    config: StackConfig
    estimate: pricing.CostEstimate
    hardware: str
    warnings: list[str]

    @property
    def outputs(self) -> dict[str, object]:
        return self.estimate.as_outputs()


def fetch_live_prices(providers: Iterable[str], environ: Mapping[str, str] | None = None) -> LivePrices:
    """Each provider's live prices, in the registry's order, with a note on each source."""
    environ = os.environ if environ is None else environ
    wanted = set(providers)
    fetched = {name: backends.get(name).live_prices(environ, LIVE_TIMEOUT_S) for name in backends.names() if name in wanted}
    return LivePrices({name: live.data for name, live in fetched.items()}, [live.note for live in fetched.values()])


def limit_warnings(config: StackConfig, estimate: pricing.CostEstimate) -> list[str]:
    """Why the run would be stopped before its last step, if it would."""
    warnings = []
    limits = config.limits
    per_step_hours = estimate.seconds_per_step / 3600
    startup_hours = pricing.STARTUP_SECONDS / 3600

    def steps_within(hours: float) -> int:
        return max(0, min(config.train.steps, int((hours - startup_hours) / per_step_hours)))

    if estimate.usd > limits.max_cost_usd:
        hours_at_limit = limits.max_cost_usd / estimate.usd_per_hour
        warnings.append(
            f"estimate ${estimate.usd:.2f} exceeds limits.maxCostUsd ${limits.max_cost_usd:g}: the run would be "
            f"stopped after about {steps_within(hours_at_limit)} of {config.train.steps} steps; raise maxCostUsd "
            "or lower train.steps"
        )
    if estimate.hours > limits.max_hours:
        warnings.append(
            f"estimate {_duration(estimate.hours)} exceeds limits.maxHours {limits.max_hours:g} h: the run would be "
            f"stopped after about {steps_within(limits.max_hours)} of {config.train.steps} steps; raise maxHours "
            "or lower train.steps"
        )
    return warnings


def cost_row(stack: str, config: StackConfig, live: LivePrices) -> CostRow:
    data = live.by_provider.get(config.provider)
    estimate = config.cost_estimate(data)
    warnings = limit_warnings(config, estimate) + config.backend.live_warnings(config, data)
    return CostRow(stack, config, estimate, config.backend.hardware(config), warnings)


def _duration(hours: float) -> str:
    minutes = round(hours * 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


COLUMNS = ("stack", "provider", "GPU / SKU", "$/hour", "s/step", "steps", "duration", "total", "limits", "price source")


def _cells(row: CostRow) -> tuple[str, ...]:
    out = row.outputs
    limits = row.config.limits
    return (
        row.stack,
        row.config.provider,
        row.hardware,
        f"${out['usdPerHour']:g}",
        f"{out['secondsPerStep']:g}",
        str(row.config.train.steps),
        _duration(row.estimate.hours),
        f"${out['estimatedCostUsd']:.2f}",
        f"${limits.max_cost_usd:g} / {limits.max_hours:g} h",
        str(out["priceSource"]),
    )


def render_text(rows: list[CostRow], live: LivePrices) -> str:
    table = [COLUMNS, *(_cells(row) for row in rows)]
    widths = [max(len(line[column]) for line in table) for column in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append("")
    lines.append(f"duration includes ~{pricing.STARTUP_SECONDS // 60}m of start-up (image pull, model download, "
                 "latent caching) on a first run")
    lines += [note for row in rows for note in row.config.backend.cost_notes(row.stack, row.config)]
    lines += [f"prices: {note}" for note in live.notes]
    lines += [f"WARNING {row.stack}: {warning}" for row in rows for warning in row.warnings]
    return "\n".join(lines)


def render_markdown(rows: list[CostRow], live: LivePrices) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = ["### Cost estimate", ""]
    warnings = [(row.stack, warning) for row in rows for warning in row.warnings]
    if warnings:
        lines += [f"> **Warning** `{stack}`: {warning}" for stack, warning in warnings] + [""]
    lines += [line(COLUMNS), "|" + "---|" * len(COLUMNS)]
    lines += [line(_cells(row)) for row in rows]
    lines += ["", f"Duration includes ~{pricing.STARTUP_SECONDS // 60} min of start-up on a first run."]
    lines += [f"- {note}" for row in rows for note in row.config.backend.cost_notes(row.stack, row.config)]
    lines += [f"- Prices: {note}" for note in live.notes]
    return "\n".join(lines)


def all_stacks() -> list[str]:
    return sorted(path.name.removeprefix("Pulumi.").removesuffix(".yaml") for path in STACKS_DIR.glob("Pulumi.*.yaml"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.cost", description=__doc__.splitlines()[0])
    parser.add_argument("stacks", nargs="*", metavar="STACK", help="stack names (default: every stack in stacks/)")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table, for a pull-request comment")
    parser.add_argument("--offline", action="store_true", help="use the dated price tables, ask no API")
    args = parser.parse_args(argv)

    configs: dict[str, StackConfig] = {}
    failed = False
    for stack in args.stacks or all_stacks():
        try:
            configs[stack] = load_stack(stack)
        except StackError as error:
            failed = True
            print(f"{stack}: not priced, the stack file is invalid:", file=sys.stderr)
            for problem in error.problems:
                print(f"  {problem}", file=sys.stderr)
    if not configs:
        return 1

    if args.offline:
        live = LivePrices({}, ["dated tables only (--offline)"])
    else:
        live = fetch_live_prices({config.provider for config in configs.values()})
    rows = [cost_row(stack, config, live) for stack, config in configs.items()]
    print(render_markdown(rows, live) if args.markdown else render_text(rows, live))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
