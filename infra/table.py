"""Plain-text tables for the command line: columns padded to their widest cell."""

from __future__ import annotations

from collections.abc import Sequence


def render_table(columns: tuple[str, ...], rows: Sequence[tuple[str, ...]], rule: bool = True) -> str:
    """One line per row under the header; `rule` puts a line of dashes under the header."""
    table = [columns, *rows]
    widths = [max(len(line[index]) for line in table) for index in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]
    if rule:
        lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
