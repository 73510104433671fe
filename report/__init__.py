"""The pictures a LoRA is judged by: per-step sample grids, the loss curve and one report page per run.

    from report import RunFacts, render_report
    render_report(Path("outputs/my-stack"), RunFacts(stack="my-stack", backend="runpod", gpu="...", cost_usd=0.41))

Torch-free (Pillow, matplotlib's Agg backend, Jinja2): infra renders fetched runs with it, and
`make train-local` its own.
"""

from report.facts import RunFacts, complete_facts, settings_from_spec
from report.page import REPORT_FILE, add_grid_to_model_card, render_report

__all__ = ["REPORT_FILE", "RunFacts", "add_grid_to_model_card", "complete_facts", "render_report", "settings_from_spec"]
