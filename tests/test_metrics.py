"""Continual-learning metrics on hand-made accuracy matrices whose values are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hyperlora.evaluation.metrics import continual_metrics

NAN = math.nan
R = [
    [0.9, 0.3, NAN],
    [0.8, 0.7, 0.5],
    [0.6, 0.65, 0.8],
]


def test_three_tasks_by_hand():
    m = continual_metrics(R, baseline=[0.1, 0.2, 0.4])
    assert m["faa"] == pytest.approx((0.6 + 0.65 + 0.8) / 3)
    assert m["daa"] == pytest.approx((0.9 + 0.7 + 0.8) / 3)
    assert m["avg_incremental_accuracy"] == pytest.approx((0.9 + 0.75 + (0.6 + 0.65 + 0.8) / 3) / 3)
    # forgetting: task 0 best before the end 0.9 -> 0.6; task 1 best 0.7 -> 0.65
    assert m["forgetting"] == pytest.approx((0.3 + 0.05) / 2)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.65 - 0.7)) / 2)
    assert m["fwt"] == pytest.approx(((0.3 - 0.2) + (0.5 - 0.4)) / 2)
    assert all(isinstance(value, float) for value in m.values())


def test_fwt_needs_a_baseline_and_the_entries_above_the_diagonal():
    assert continual_metrics(R)["fwt"] is None
    missing = np.array(R)
    missing[0, 1] = NAN
    assert continual_metrics(missing, baseline=[0, 0, 0])["fwt"] is None


def test_fwt_from_start_values_when_the_matrix_holds_seen_tasks_only():
    seen_only = np.where(np.tril(np.ones((3, 3))) > 0, np.array(R), NAN)
    m = continual_metrics(seen_only, baseline=[0.1, 0.2, 0.4], start=[NAN, 0.3, 0.5])
    assert m == continual_metrics(R, baseline=[0.1, 0.2, 0.4])
    with pytest.raises(ValueError, match="start must have one entry per task"):
        continual_metrics(seen_only, baseline=[0.1, 0.2, 0.4], start=[0.3, 0.5])


def test_single_task():
    m = continual_metrics([[0.75]])
    assert m == {
        "faa": 0.75,
        "daa": 0.75,
        "avg_incremental_accuracy": 0.75,
        "forgetting": None,
        "bwt": None,
        "fwt": None,
    }


@pytest.mark.parametrize(
    "matrix, baseline, match",
    [
        ([[0.5, 0.5]], None, "square"),
        ([], None, "square"),
        ([[0.5, NAN], [NAN, 0.5]], None, "below the diagonal"),
        (R, [0.1, 0.2], "one entry per task"),
    ],
)
def test_bad_input(matrix, baseline, match):
    with pytest.raises(ValueError, match=match):
        continual_metrics(matrix, baseline=baseline)
