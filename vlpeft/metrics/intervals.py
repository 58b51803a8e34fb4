"""Means and 95 % confidence intervals over seeds, and whether two methods' difference is resolved.

Pure Python (no numpy, no scipy). Used by ``vlpeft sweep`` and meant for reports that give every score as
mean ± ci95 over seeds.

Definitions (n values x_1..x_n of one method, e.g. one test score per seed):

- ``mean`` = (1/n) Σ x_i; ``std`` = the sample standard deviation, sqrt(Σ (x_i - mean)² / (n - 1));
- ``ci95`` = the **half-width** of the two-sided 95 % Student-t interval of the mean,
  t_{0.975, n-1} · std / sqrt(n), so the interval is [mean - ci95, mean + ci95];
- n = 1: ``std`` and ``ci95`` are ``None`` (one seed says nothing about the spread; ``None`` is written as
  ``null`` in JSON). n = 0 is an error.

Critical values t_{0.975, ν} (:func:`t_critical_95`): a table for ν = 1..30 (the usual 3-decimal table values,
given here to 9 decimals), linear interpolation in 1/ν between integer ν (Welch's ν is fractional), and for
ν > 30 the Cornish-Fisher expansion of the t quantile around the normal one (Abramowitz & Stegun 26.7.5, three
terms; within 1e-4 of the exact quantile there); the normal value 1.959963985 is its limit.

Resolved differences (:func:`compare`): methods A and B with per-seed values a and b differ *resolvably* when the
Welch 95 % interval of mean(a) - mean(b) excludes 0, i.e.
|mean(a) - mean(b)| > t_{0.975, ν} · sqrt(s_a²/n_a + s_b²/n_b) with the Welch-Satterthwaite ν. This is Welch's
two-sided t-test at the 5 % level, one comparison at a time (no correction for comparing many methods). Each side
needs at least 2 values; with fewer the difference is reported as not resolved (``ci95`` ``None``). When both
sides have zero spread (every seed gave the same value, as happens with small discrete test sets) the interval is
the single point mean(a) - mean(b): resolved exactly when the two means differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["NORMAL_975", "T_975", "Difference", "Interval", "compare", "mean_ci95", "resolved", "t_critical_95"]

#: The standard normal 0.975 quantile.
NORMAL_975 = 1.959963984540054

#: Student-t 0.975 quantiles (two-sided 95 %) for ν = 1..30 degrees of freedom.
T_975: dict[int, float] = {
    1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 5: 2.570581836,
    6: 2.446911851, 7: 2.364624252, 8: 2.306004135, 9: 2.262157163, 10: 2.228138852,
    11: 2.200985160, 12: 2.178812830, 13: 2.160368656, 14: 2.144786688, 15: 2.131449546,
    16: 2.119905299, 17: 2.109815578, 18: 2.100922040, 19: 2.093024054, 20: 2.085963447,
    21: 2.079613845, 22: 2.073873068, 23: 2.068657610, 24: 2.063898562, 25: 2.059538553,
    26: 2.055529439, 27: 2.051830516, 28: 2.048407142, 29: 2.045229642, 30: 2.042272456,
}


def _cornish_fisher(dof: float) -> float:
    """t_{0.975, ν} from the normal quantile (A&S 26.7.5, terms up to 1/ν³)."""
    z = NORMAL_975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3


def t_critical_95(dof: float) -> float:
    """The two-sided 95 % Student-t critical value t_{0.975, ν} for ν >= 1 degrees of freedom (ν may be
    fractional; ``math.inf`` gives the normal value). Raises ``ValueError`` for ν < 1 or NaN."""
    if not isinstance(dof, int | float) or isinstance(dof, bool) or math.isnan(dof) or dof < 1:
        raise ValueError(f"degrees of freedom must be a number >= 1, got {dof!r}")
    if math.isinf(dof):
        return NORMAL_975
    if dof > 30:
        return _cornish_fisher(dof)
    low = math.floor(dof)
    if low == dof:
        return T_975[int(low)]
    high = low + 1
    # linear in 1/ν between the neighbouring table entries (the quantile is smooth and nearly linear in 1/ν)
    weight = (1 / low - 1 / dof) / (1 / low - 1 / high)
    return T_975[low] + weight * (T_975[high] - T_975[low])


def _values(values: Iterable[float], name: str) -> list[float]:
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name}: every value must be a finite number, got {value!r}")
        out.append(float(value))
    if not out:
        raise ValueError(f"{name}: at least one value is needed")
    return out


@dataclass(frozen=True)
class Interval:
    """Mean ± 95 % confidence half-width of n values (``std``/``ci95`` ``None`` when n = 1)."""

    n: int
    mean: float
    std: float | None
    ci95: float | None

    @property
    def low(self) -> float | None:
        return None if self.ci95 is None else self.mean - self.ci95

    @property
    def high(self) -> float | None:
        return None if self.ci95 is None else self.mean + self.ci95

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def format(self, digits: int = 2) -> str:
        """``"52.70 ± 1.04"``, or ``"52.70"`` for one value."""
        if self.ci95 is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.ci95:.{digits}f}"


def _mean_var(values: Sequence[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    return mean, math.fsum((v - mean) ** 2 for v in values) / (n - 1)


def mean_ci95(values: Iterable[float]) -> Interval:
    """Mean and Student-t 95 % half-width (n - 1 degrees of freedom) of ``values`` (e.g. one score per seed)."""
    data = _values(values, "mean_ci95")
    mean, var = _mean_var(data)
    if var is None:
        return Interval(1, mean, None, None)
    std = math.sqrt(var)
    n = len(data)
    return Interval(n, mean, std, t_critical_95(n - 1) * std / math.sqrt(n))


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with its Welch 95 % half-width; ``resolved``: the interval excludes 0 (see the module
    docstring). ``dof`` is the Welch-Satterthwaite ν (``None`` when undefined: fewer than 2 values on a side, or
    zero spread on both)."""

    diff: float
    ci95: float | None
    dof: float | None
    resolved: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare(a: Iterable[float], b: Iterable[float]) -> Difference:
    """Welch comparison of two methods' per-seed values ``a`` and ``b`` (the seeds need not be paired)."""
    xa, xb = _values(a, "compare(a)"), _values(b, "compare(b)")
    mean_a, var_a = _mean_var(xa)
    mean_b, var_b = _mean_var(xb)
    diff = mean_a - mean_b
    if var_a is None or var_b is None:
        return Difference(diff, None, None, False)
    va, vb = var_a / len(xa), var_b / len(xb)
    se2 = va + vb
    if se2 == 0.0:
        return Difference(diff, 0.0, None, diff != 0.0)
    dof = se2**2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    half = t_critical_95(max(1.0, dof)) * math.sqrt(se2)
    return Difference(diff, half, dof, abs(diff) > half)


def resolved(a: Iterable[float], b: Iterable[float]) -> bool:
    """Whether the seeds resolve the difference between methods ``a`` and ``b`` (:func:`compare`)."""
    return compare(a, b).resolved
