"""What the benchmark scripts print: their --help, the settings a run measured, and markdown tables."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows flag defaults and keeps the module docstring's line breaks."""


def fmt(value: float | int | str | None, digits: int = 2) -> str:
    """A table cell: floats rounded to `digits`, None as n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 0) -> str:
    """A markdown table with padded columns: the first `left` columns (labels) left-aligned, the
    others (numbers) right-aligned."""
    widths = [max(map(len, column)) for column in zip(header, *rows)]
    rule = [":" + "-" * max(w - 1, 1) if i < left else "-" * max(w - 1, 1) + ":" for i, w in enumerate(widths)]
    lines = [
        [cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))]
        for cells in (header, *rows)
    ]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [lines[0], rule, *lines[1:]])


def settings(config: Mapping[str, Any]) -> str:
    """A run's settings as a markdown list, one `- key: value` line each."""
    return "\n".join(f"- {key}: {value}" for key, value in config.items())
