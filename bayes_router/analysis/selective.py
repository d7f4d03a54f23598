"""Selective prediction: the risk-coverage curve of an uncertainty score and the area under it
(AURC).

A score ranks predictions from most to least trusted (higher = more uncertain). Keeping the
``k`` most trusted of ``N`` predictions gives coverage ``k / N`` and risk ``R(k)``, the mean loss
of the kept predictions (loss ``1 - correct`` gives the selective error; the per-token NLL is
another choice). The AURC is ``(1 / N) sum_{k=1..N} R(k)``; lower is better.

**Ties.** Where a score ties across a cut, which tied predictions are kept is arbitrary. We
take the expectation over a uniformly random order of the tied predictions: since ``R(k)`` is
linear in which losses are kept, that is the same as giving every member of a tie group the
group's mean loss. So the result does not depend on the order of the inputs, a constant score
has ``R(k) = `` the overall risk for every ``k`` (AURC = the overall error), and a score with
no ties is ranked exactly. The tests check this against a brute-force average over every
order of the ties.

**Weights** are multiplicities (weight 2 = the prediction twice, adjacent in the ranking); the
window bootstrap uses them. Within a tie group of total weight ``W`` and mean loss ``m``,
starting after cumulative weight ``a`` and loss ``L``, the ``W`` terms of the AURC sum to
``sum_{k=a+1..a+W} (L + (k - a) m) / k = (L - a m) (H_{a+W} - H_a) + W m`` with ``H`` the harmonic
numbers, so the AURC of a resample costs ``O(N)`` without re-sorting.

The best possible score orders the predictions by their own loss (every ``R(k)`` is then
minimal); for the 0-1 loss with error rate ``r`` its AURC is
``(1 / N) sum_{k > (1-r) N} (k - (1 - r) N) / k``, about ``r + (1 - r) log(1 - r)``. The excess
AURC (E-AURC) is the difference to it.

References:
  - *Selective Classification for Deep Neural Networks*, Geifman, El-Yaniv (NeurIPS 2017)
  - *Bias-Reduced Uncertainty Estimation for Deep Neural Classifiers*, Geifman, Uziel,
    El-Yaniv (ICLR 2019): AURC and E-AURC
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import digamma

from bayes_router.analysis.calibration_metrics import check_bootstrap
from bayes_router.core.arrays import check_same_length, float_array

CURVE_POINTS = 101  # coverage 0, 0.01, ..., 1 in stored curves
EXACT_HARMONIC_TERMS = 16


def _scores_losses(scores, losses, weights=None):
    s = float_array(scores, "scores", ndims=(1,))
    loss = float_array(losses, "losses", ndims=(1,))
    check_same_length(scores=s, losses=loss)
    if weights is None:
        return s, loss, np.ones_like(s)
    w = float_array(weights, "weights", ndims=(1,))
    check_same_length(scores=s, weights=w)
    if np.any(w < 0) or np.any(w != np.round(w)) or not np.any(w > 0):
        raise ValueError("weights must be non-negative integers (multiplicities) with a "
                         "positive sum")
    return s, loss, w


def _harmonic_difference(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``H_{start + count} - H_start = sum_{j=1..count} 1 / (start + j)`` for integer
    ``start >= 0`` and ``count >= 1``: summed term by term for counts up to
    :data:`EXACT_HARMONIC_TERMS`, through the digamma function above."""
    result = 1 / (start + 1)
    small = count <= EXACT_HARMONIC_TERMS
    for j in range(2, int(count[small].max(initial=0)) + 1):
        rows = np.flatnonzero(small & (count >= j))
        result[rows] += 1 / (start[rows] + j)
    large = ~small
    result[large] = digamma(start[large] + count[large] + 1) - digamma(start[large] + 1)
    return result


class _Ranking:
    """The order of a score and its tie groups, reusable for many weightings of the losses."""

    def __init__(self, scores: np.ndarray):
        self.order = np.argsort(scores, kind="stable")
        ordered = scores[self.order]
        self.starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # group starts
        self.tied = len(self.starts) < len(scores)

    def group_sums(self, values: np.ndarray) -> np.ndarray:
        ordered = values[self.order]
        return np.add.reduceat(ordered, self.starts) if self.tied else ordered

    def area(self, losses: np.ndarray, weights: np.ndarray) -> float:
        """The AURC of ``losses`` weighted by ``weights`` under this ranking."""
        weight = self.group_sums(weights)
        loss = self.group_sums(weights * losses)
        kept = weight > 0
        weight, loss = weight[kept], loss[kept]
        mean = loss / weight
        before = np.cumsum(weight) - weight  # a: weight ranked before each group
        loss_before = np.cumsum(loss) - loss  # L
        harmonic = _harmonic_difference(before, weight)
        terms = (loss_before - before * mean) * harmonic + weight * mean
        return float(terms.sum() / weight.sum())


@dataclass(frozen=True)
class RiskCoverageCurve:
    """Risk of the most trusted predictions against their share.

    :ivar coverage: share of predictions kept ``(n,)``, increasing to 1.
    :ivar risk: mean loss of the kept predictions ``(n,)`` (ties in expectation, see the module
        docstring).
    """

    coverage: np.ndarray
    risk: np.ndarray

    def __post_init__(self):
        if len(self.coverage) != len(self.risk) or len(self.coverage) == 0:
            raise ValueError(f"curve: coverage and risk must be non-empty and of one length, "
                             f"got {len(self.coverage)} and {len(self.risk)}")


def risk_coverage_curve(scores, losses) -> RiskCoverageCurve:
    """The risk-coverage curve: for ``k = 1..N``, coverage ``k / N`` and the mean loss of the
    ``k`` predictions with the lowest scores (Geifman & El-Yaniv 2017). Ties in the score
    are averaged over (see the module docstring).

    :param scores: uncertainty per prediction ``(N,)``, higher = less trusted.
    :param losses: loss per prediction ``(N,)``, e.g. ``1 - correct`` or the NLL.
    """
    s, loss, _ = _scores_losses(scores, losses)
    ranking = _Ranking(s)
    sizes = np.diff(np.r_[ranking.starts, len(s)])
    tied_mean = np.repeat(ranking.group_sums(loss) / sizes, sizes)  # (N,) in ranked order
    kept = np.arange(1, len(s) + 1)
    return RiskCoverageCurve(kept / len(s), np.cumsum(tied_mean) / kept)


def area_under_risk_coverage(scores, losses, weights=None) -> float:
    """AURC: the mean of the risk-coverage curve over ``k = 1..N`` (Geifman et al. 2019).

    A constant (or random, in expectation) score gives the overall mean loss; ordering by the
    loss itself gives the minimum, :func:`oracle_area_under_risk_coverage`.

    :param scores: uncertainty per prediction ``(N,)``, higher = less trusted.
    :param losses: loss per prediction ``(N,)``.
    :param weights: multiplicities ``(N,)`` (default 1).
    """
    s, loss, w = _scores_losses(scores, losses, weights)
    return _Ranking(s).area(loss, w)


def oracle_area_under_risk_coverage(losses, weights=None) -> float:
    """The smallest AURC any score reaches on ``losses``: that of ranking by the loss."""
    loss = float_array(losses, "losses", ndims=(1,))
    return area_under_risk_coverage(loss, loss, weights)


def excess_area_under_risk_coverage(scores, losses, weights=None) -> float:
    """E-AURC: the AURC minus the oracle's (Geifman et al. 2019); 0 for a perfect ranking."""
    return (area_under_risk_coverage(scores, losses, weights)
            - oracle_area_under_risk_coverage(losses, weights))


def _curve_points(curve: RiskCoverageCurve, n_points: int = CURVE_POINTS) -> dict:
    """The curve at coverages ``linspace(0, 1, n_points)`` (the first point is the risk at the
    smallest coverage), for storage."""
    index = np.clip(np.ceil(np.linspace(0, 1, n_points) * len(curve.risk)).astype(int) - 1,
                    0, len(curve.risk) - 1)
    return {"coverage": curve.coverage[index], "risk": curve.risk[index]}


def selective_prediction_summary(scores: dict[str, np.ndarray], losses: dict[str, np.ndarray],
                                 window_len: int, reference: str, n_boot: int = 1000,
                                 level: float = 0.95, seed: int = 0) -> dict:
    """AURC of every score for every loss, with a percentile-bootstrap interval over windows
    and the paired difference ``AURC(score) - AURC(reference)`` (same resamples).

    :param scores: named uncertainty scores ``(N,)`` (higher = less trusted), tokens in window
        order, ``N`` a multiple of ``window_len``.
    :param losses: named losses ``(N,)``, e.g. ``{"error": 1 - correct, "nll": nll}``.
    :param reference: the score the others are compared with (a key of ``scores``).
    :return: per loss: ``overall`` (mean loss), ``oracle_aurc``, and per score ``aurc``,
        ``e_aurc`` and ``minus_reference`` (each ``{"value", "low", "high"}`` but ``e_aurc``)
        and ``curve`` (the risk-coverage curve at 101 coverages).
    """
    if reference not in scores:
        raise ValueError(f"reference must be one of the scores {sorted(scores)}, "
                         f"got {reference!r}")
    if not losses:
        raise ValueError("losses is empty: nothing to rank")
    check_bootstrap(n_boot, level)
    checked_scores = {name: float_array(score, f"scores[{name!r}]", ndims=(1,))
                      for name, score in scores.items()}
    checked_losses = {name: float_array(loss, f"losses[{name!r}]", ndims=(1,))
                      for name, loss in losses.items()}
    n = check_same_length(**{f"scores[{k!r}]": v for k, v in checked_scores.items()},
                          **{f"losses[{k!r}]": v for k, v in checked_losses.items()})
    if isinstance(window_len, bool) or not isinstance(window_len, (int, np.integer)) \
            or window_len < 1 or n % window_len:
        raise ValueError(f"window_len must be an integer >= 1 dividing the {n} tokens, "
                         f"got {window_len!r}")
    rankings = {name: _Ranking(score) for name, score in checked_scores.items()}
    n_windows = n // window_len
    rng = np.random.default_rng(seed)
    replicates = {(loss_name, name): np.empty(n_boot) for loss_name in losses for name in scores}
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, n_windows, n_windows), minlength=n_windows)
        weights = np.repeat(counts, window_len).astype(np.float64)
        for loss_name in losses:
            for name, ranking in rankings.items():
                replicates[loss_name, name][b] = ranking.area(checked_losses[loss_name], weights)
    tail = (1.0 - level) / 2.0

    def interval(value: float, draws: np.ndarray) -> dict:
        low, high = np.quantile(draws, [tail, 1.0 - tail])
        return {"value": value, "low": float(low), "high": float(high)}

    result = {}
    ones = np.ones(n)
    for loss_name, loss in checked_losses.items():
        oracle = _Ranking(loss).area(loss, ones)
        values = {name: ranking.area(loss, ones) for name, ranking in rankings.items()}
        result[loss_name] = {"overall": float(loss.mean()), "oracle_aurc": oracle, "scores": {
            name: {"aurc": interval(values[name], replicates[loss_name, name]),
                   "e_aurc": values[name] - oracle,
                   "minus_reference": interval(
                       values[name] - values[reference],
                       replicates[loss_name, name] - replicates[loss_name, reference]),
                   "curve": _curve_points(risk_coverage_curve(checked_scores[name], loss))}
            for name in scores}}
        result[loss_name]["oracle_curve"] = _curve_points(risk_coverage_curve(loss, loss))
    return result


def curve_from_points(points: dict) -> RiskCoverageCurve:
    """The :class:`RiskCoverageCurve` stored by :func:`selective_prediction_summary`."""
    return RiskCoverageCurve(np.asarray(points["coverage"], dtype=float),
                             np.asarray(points["risk"], dtype=float))
