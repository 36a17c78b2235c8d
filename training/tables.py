"""An aligned plain-text table for printing metrics beside their baselines (``docs/metrics.md``, *Printing*)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["format_table"]



def _format_cell(value: object, precision: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.{precision}f}"
    return str(value)


def _is_numeric_column(values: Sequence[object]) -> bool:
    """True if the column has at least one value and every non-None value is a (non-bool) number."""
    present = [v for v in values if v is not None]
    return bool(present) and all(
        isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)
        for v in present
    )


def format_table(
    rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None, precision: int = 3
) -> str:
    """Render rows of metrics as an aligned plain-text table.

    Args:
        rows: one mapping per row (e.g. ``{"model": "tiny", "P@0.5": 0.81}``).
        columns: the columns in order; default all keys in first-seen order.
        precision: decimals for floats.

    Returns:
        Header line, a line of dashes, one line per row; columns separated by two spaces, numbers
        right-aligned, other cells left-aligned, missing cells and ``None`` shown as ``-``. No trailing newline
        and no trailing spaces.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    columns = list(columns)
    cells = [[_format_cell(row.get(col), precision) for col in columns] for row in rows]
    numeric = [_is_numeric_column([row.get(col) for row in rows]) for col in columns]
    widths = [max([len(col)] + [len(line[k]) for line in cells]) for k, col in enumerate(columns)]

    def render(line: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[k]) if numeric[k] else cell.ljust(widths[k]) for k, cell in enumerate(line)
        ]
        return "  ".join(parts).rstrip()

    out = [render(columns), "  ".join("-" * w for w in widths)]
    out.extend(render(line) for line in cells)
    return "\n".join(out)
