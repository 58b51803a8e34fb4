"""vlpeft.metrics.intervals: t critical values, mean ± ci95 over seeds, Welch resolution of differences.

Expected values are computed by hand in the comments (t quantiles from standard tables)."""

import json
import math

import pytest

from vlpeft.metrics.intervals import NORMAL_975, compare, mean_ci95, resolved, t_critical_95


@pytest.mark.parametrize(("dof", "expected"), [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571),
                                               (10, 2.228), (20, 2.086), (30, 2.042)])
def test_t_table_matches_published_quantiles(dof, expected):
    assert t_critical_95(dof) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize(("dof", "expected"), [(40, 2.021), (60, 2.000), (120, 1.980)])
def test_t_beyond_the_table_follows_the_published_quantiles(dof, expected):
    assert t_critical_95(dof) == pytest.approx(expected, abs=5e-4)


def test_t_is_continuous_and_decreasing_and_tends_to_the_normal_value():
    grid = [1 + k / 10 for k in range(0, 600)]
    values = [t_critical_95(d) for d in grid]
    assert all(a > b for a, b in zip(values, values[1:]))
    # the join between the table and the expansion at 30 is smooth: no jump larger than the neighbouring steps
    assert t_critical_95(30) - t_critical_95(30.1) < t_critical_95(29.9) - t_critical_95(30) + 1e-4
    assert t_critical_95(math.inf) == NORMAL_975
    assert t_critical_95(1e9) == pytest.approx(1.959964, abs=1e-6)
    # fractional dof lies between its neighbours
    assert t_critical_95(4) > t_critical_95(4.5) > t_critical_95(5)


@pytest.mark.parametrize("dof", [0, 0.5, -1, float("nan"), "3", None, True])
def test_t_rejects_bad_dof(dof):
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_critical_95(dof)


def test_mean_ci95_by_hand():
    # 1, 2, 3: mean 2, s = 1, ci95 = t_{.975,2} * 1 / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    interval = mean_ci95([1, 2, 3])
    assert (interval.n, interval.mean, interval.std) == (3, 2.0, 1.0)
    assert interval.ci95 == pytest.approx(2.484138, abs=1e-6)
    assert interval.low == pytest.approx(2 - 2.484138, abs=1e-6)
    assert interval.format(3) == "2.000 ± 2.484"
    # 10, 12: mean 11, s = sqrt(2), ci95 = t_{.975,1} * sqrt(2) / sqrt(2) = 12.706205
    assert mean_ci95([10, 12]).ci95 == pytest.approx(12.706205, abs=1e-6)
    # five values 50, 52, 54, 56, 58 -> mean 54, s = sqrt(10) = 3.162278,
    # ci95 = 2.776445 * 3.162278 / sqrt(5) = 3.926486
    assert mean_ci95([50, 52, 54, 56, 58]).ci95 == pytest.approx(3.926486, abs=1e-6)


def test_mean_ci95_single_value_has_no_interval_and_serialises_to_null():
    interval = mean_ci95([61.5])
    assert interval.mean == 61.5 and interval.std is None and interval.ci95 is None
    assert interval.low is None and interval.format() == "61.50"
    assert json.loads(json.dumps(interval.to_json())) == {"n": 1, "mean": 61.5, "std": None, "ci95": None}


def test_mean_ci95_identical_values_give_zero_width():
    interval = mean_ci95([68.67, 68.67, 68.67])
    assert interval.std == 0.0 and interval.ci95 == 0.0


@pytest.mark.parametrize("values", [[], [1.0, float("nan")], [float("inf")], ["1"], [None], [True]])
def test_mean_ci95_rejects_bad_values(values):
    with pytest.raises(ValueError):
        mean_ci95(values)


def test_compare_resolved_difference_by_hand():
    # a = 1, 2, 3 and b = 4, 5, 6: diff -3; s_a^2/n = s_b^2/n = 1/3; se = sqrt(2/3) = 0.816497;
    # Welch dof = (2/3)^2 / (2 * (1/3)^2 / 2) = 4; half-width = 2.776445 * 0.816497 = 2.266958 < 3: resolved
    difference = compare([1, 2, 3], [4, 5, 6])
    assert difference.diff == -3.0
    assert difference.dof == pytest.approx(4.0)
    assert difference.ci95 == pytest.approx(2.266958, abs=1e-6)
    assert difference.resolved and resolved([1, 2, 3], [4, 5, 6])
    # shifted by 1 only: |diff| = 1 < 2.266958: not resolved
    assert not compare([1, 2, 3], [2, 3, 4]).resolved


def test_compare_unequal_variances_by_hand():
    # a = 1, 1, 1 (no spread), b = 0, 1, 2: va = 0, vb = 1/3, dof = (1/3)^2 / ((1/3)^2 / 2) = 2,
    # half-width = 4.302653 * sqrt(1/3) = 2.484138
    difference = compare([1, 1, 1], [0, 1, 2])
    assert difference.dof == pytest.approx(2.0)
    assert difference.ci95 == pytest.approx(2.484138, abs=1e-6)
    assert difference.diff == 0.0 and not difference.resolved
    # a = 10, 10, 10 vs b = 0, 1, 2: diff 9 > 2.484138
    assert compare([10, 10, 10], [0, 1, 2]).resolved


def test_compare_fractional_welch_dof():
    # a = 0, 2 (var 2, n 2), b = 0, 1, 2, 3 (var 5/3, n 4): va = 1, vb = 5/12, se2 = 17/12;
    # dof = (17/12)^2 / (1/1 + (5/12)^2/3) = 2.006944 / 1.057870 = 1.897156
    difference = compare([0, 2], [0, 1, 2, 3])
    assert difference.dof == pytest.approx(1.897156, abs=1e-6)
    assert t_critical_95(2) < difference.ci95 / math.sqrt(17 / 12) < t_critical_95(1)


def test_compare_edge_cases():
    # one seed on a side: the spread is unknown, never resolved
    assert compare([50.0], [10.0, 11.0]).ci95 is None
    assert not resolved([50.0], [10.0, 11.0])
    # both constant: the interval is a point, resolved iff the means differ
    assert compare([68.67] * 3, [60.0] * 3).resolved
    point = compare([5.0, 5.0], [5.0, 5.0])
    assert point.ci95 == 0.0 and not point.resolved
