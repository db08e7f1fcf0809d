"""Bootstrap confidence intervals of evaluation figures, and the paired comparison of two predictions files.

    ci = bootstrap_ci(stat, n=451, resamples=1000, seed=0)            # {"closed_accuracy": [lo, hi], ...}
    cmp = paired_comparison(stat_a, stat_b, n=451, resamples=1000)   # {"closed_accuracy": {"diff", "ci", "p"}, ...}

`stat(indices)` returns a task's metrics dict for the questions at `indices` (with repeats: a resample), as
`Task.scorer` builds it. Each resample draws n question indices with replacement (numpy's PCG64 seeded by `seed`,
so a figure's interval is the same on every run); the interval is the percentile interval: the (100 - level) / 2 and
100 - (100 - level) / 2 percentiles of the resampled values (Efron & Tibshirani 1993, ch. 13). Only float metrics
(the percentages) get intervals; counts do not. A metric undefined in a resample (no open question drawn) skips it.

Paired comparison of system A (this file) with system B (another file answering the same questions): the same index
draws score both, so the difference's interval accounts for the questions both find hard. `diff` = A - B on all
questions; `p` is the two-sided paired bootstrap p-value, twice the smaller share of resampled differences on either
side of zero (<= 0 and >= 0), capped at 1 (Koehn 2004's paired bootstrap, two-sided). Identical files give diff 0
and p 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Stat = Callable[[Sequence[int]], dict[str, Any]]
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 95.0


def figure_keys(metrics: dict[str, Any]) -> list[str]:
    """The metrics that get intervals: float values (percentages); counts (ints), strings and None do not."""
    return [k for k, v in metrics.items() if isinstance(v, float) and not math.isnan(v)]


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) int array: each row n indices drawn uniformly with replacement from range(n)."""
    if n < 1:
        raise ValueError("the bootstrap needs at least one question")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _values(stat: Stat, draws: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
    out = {k: np.full(len(draws), np.nan) for k in keys}
    for i, idx in enumerate(draws):
        m = stat(idx.tolist())
        for k in keys:
            v = m.get(k)
            if isinstance(v, (int, float)):
                out[k][i] = v
    return out


def _interval(values: np.ndarray, level: float) -> list[float] | None:
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    tail = (100.0 - level) / 2
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def bootstrap_ci(stat: Stat, n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 level: float = DEFAULT_LEVEL, keys: Sequence[str] | None = None) -> dict[str, list[float] | None]:
    """Percentile intervals `{metric: [lo, hi]}` of every float metric of `stat(range(n))` (or of `keys`)."""
    keys = figure_keys(stat(list(range(n)))) if keys is None else list(keys)
    values = _values(stat, resample_indices(n, resamples, seed), keys)
    return {k: _interval(values[k], level) for k in keys}


def paired_comparison(stat_a: Stat, stat_b: Stat, n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                      level: float = DEFAULT_LEVEL) -> dict[str, dict[str, Any]]:
    """Per float metric both systems report: `{"this", "other", "diff", "ci", "p"}` (A - B; see module docstring).

    `stat_a` and `stat_b` must score the same questions in the same order (index i is one question for both).
    """
    full_a, full_b = stat_a(list(range(n))), stat_b(list(range(n)))
    keys = [k for k in figure_keys(full_a) if k in figure_keys(full_b)]
    draws = resample_indices(n, resamples, seed)
    va, vb = _values(stat_a, draws, keys), _values(stat_b, draws, keys)
    out = {}
    for k in keys:
        d = va[k] - vb[k]
        d = d[~np.isnan(d)]
        p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0)))) if len(d) else None
        out[k] = {"this": full_a[k], "other": full_b[k], "diff": full_a[k] - full_b[k],
                  "ci": _interval(d, level) if len(d) else None, "p": p}
    return out
