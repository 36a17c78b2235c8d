"""Tests for training/tables.py and training/metrics.py: the results table, and the referring score's AUROC.

Every expected value is computed by hand in the comments next to it (or follows from a property of the
definition stated in docs/metrics.md), never by the code under test.
"""

from __future__ import annotations

import pytest

from training.metrics import score_auroc
from training.tables import format_table

# ----------------------------------------------------------------------------------------------- table


def test_format_table() -> None:
    rows = [
        {"model": "tiny", "P@0.5": 0.81234, "n": 12},
        {"model": "paper (ref)", "P@0.5": 0.898, "n": None},
    ]
    expected = "\n".join(
        [
            "model        P@0.5   n",
            "-----------  -----  --",
            "tiny         0.812  12",
            "paper (ref)  0.898   -",
        ]
    )
    assert format_table(rows) == expected


def test_format_table_column_selection_and_missing_cells() -> None:
    rows = [{"a": 1.0, "b": "x"}, {"b": "long text"}]
    expected = "\n".join(
        [
            "b             a",
            "---------  ----",
            "x          1.00",
            "long text     -",
        ]
    )
    assert format_table(rows, columns=["b", "a"], precision=2) == expected


def test_score_auroc_by_hand():
    # pairs (positive, negative): (0.9, 0.5) yes, (0.9, 0.1) yes, (0.4, 0.5) no, (0.4, 0.1) yes -> 3 of 4
    assert score_auroc([0.9, 0.4], [0.5, 0.1]) == pytest.approx(0.75)
    assert score_auroc([0.5, 0.5], [0.5]) == pytest.approx(0.5)  # ties count one half
    assert score_auroc([0.2], [0.3, 0.4]) == 0.0 and score_auroc([3.0], [1.0, 2.0]) == 1.0
    with pytest.raises(ValueError, match="positives and negatives"):
        score_auroc([], [0.1])
    with pytest.raises(ValueError, match="finite"):
        score_auroc([float("nan")], [0.1])
