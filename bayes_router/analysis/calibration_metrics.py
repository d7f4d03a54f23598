"""Prediction (calibration) metrics and a bootstrap for any metric.

The routing metrics (``projected_flop_cost`` and co.) live in :mod:`bayes_router.core.routing`,
below the inference layer that evaluates with them.

Prediction metrics take probabilities ``probs (N, C)`` (rows on the simplex, not logits) and
integer ``labels (N,)``. All metrics accept NumPy arrays or torch tensors and return Python floats
(or NumPy arrays); they never modify their inputs.

**Bin convention of the calibration metrics.** Equal-width bins follow torchmetrics'
``multiclass_calibration_error``: boundaries ``torch.linspace(0, 1, n_bins + 1)`` and the bin of a
confidence ``s`` is ``torch.bucketize(s, boundaries, right=True) - 1``, i.e. bin ``j`` is the
half-open interval ``[b_j, b_{j+1})``, so a confidence exactly on an inner edge belongs to the
bin *above* it. torchmetrics then counts a confidence of exactly 1.0 in a hidden
``(n_bins + 1)``-th bin of its own (Lightning-AI/torchmetrics issue #3510); we clamp the index to
``n_bins - 1`` instead, so the last bin is the closed interval ``[1 - 1/n_bins, 1]`` as in Guo et
al. (2017). Bins are computed in the precision of ``probs``: float32 probabilities are assigned
exactly as torchmetrics assigns them (it casts to float32); float64 ones are binned in float64.
Equal-mass bins sort the confidences (stably) and cut them into ``n_bins`` runs whose sizes differ
by at most one.

The smooth ECE lives in :mod:`bayes_router.analysis.smooth_calibration`, the risk-coverage
curve in :mod:`bayes_router.analysis.selective`.

References:
  - *On Calibration of Modern Neural Networks*, Guo, Pleiss, Sun, Weinberger (ICML 2017)
  - *Measuring Calibration in Deep Learning*, Nixon, Dusenberry, Zhang, Jerfel, Tran (2019)
  - *Beyond temperature scaling: Obtaining well-calibrated multiclass probabilities with
    Dirichlet calibration*, Kull, Perello-Nieto, Kängsepp, Silva Filho, Song, Flach
    (NeurIPS 2019)
  - *Verified Uncertainty Calibration*, Kumar, Liang, Ma (NeurIPS 2019)
  - *Verification of forecasts expressed in terms of probability*, Brier (1950)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bayes_router.core.arrays import (
    check_n_bins,
    check_same_length,
    check_simplex,
    equal_mass_bin_index,
    float_array,
    label_array,
    to_numpy,
)

BINNINGS = ("equal-width", "equal-mass")


# -------------------------------------------------------------------------- prediction metrics


def _predictions(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``probs (N, C)`` (float32 or float64) and ``labels (N,)`` (int64)."""
    p = float_array(probs, "probs", ndims=(2,), keep_float32=True)
    check_simplex(p, "probs")
    y = label_array(labels, "labels", n_classes=p.shape[1])
    check_same_length(probs=p, labels=y)
    return p, y


def _check_binning(binning: str) -> None:
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")


def _equal_width_edges(n_bins: int, dtype) -> np.ndarray:
    torch_dtype = torch.float32 if dtype == np.float32 else torch.float64
    return torch.linspace(0, 1, n_bins + 1, dtype=torch_dtype).numpy()


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin summary of top-label predictions; empty bins hold NaN confidence and accuracy.

    :ivar confidence: mean top-label confidence per bin ``(n_bins,)``.
    :ivar accuracy: fraction of correct top-label predictions per bin ``(n_bins,)``.
    :ivar count: number of predictions per bin ``(n_bins,)``.
    :ivar edges: bin boundaries ``(n_bins + 1,)`` from 0 to 1. For equal-mass bins an inner edge
        is the midpoint between the neighbouring runs' extreme confidences (1 past the data).
    :ivar binning: ``"equal-width"`` or ``"equal-mass"``.
    """

    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    edges: np.ndarray
    binning: str = "equal-width"

    def __post_init__(self):
        n_bins = len(self.count)
        if not (len(self.confidence) == len(self.accuracy) == n_bins == len(self.edges) - 1):
            raise ValueError(
                "curve: confidence, accuracy and count must share the length n_bins and edges "
                f"must have n_bins + 1 entries, got {len(self.confidence)}, {len(self.accuracy)}, "
                f"{n_bins} and {len(self.edges)}"
            )

    @property
    def n_bins(self) -> int:
        return len(self.count)

    @property
    def calibration_gap(self) -> np.ndarray:
        """``|accuracy - confidence|`` per bin (NaN for empty bins)."""
        return np.abs(np.asarray(self.accuracy) - np.asarray(self.confidence))


def top_label_outcomes(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence ``max_c p_c`` and outcome (1.0 where the argmax is the label), both
    float64 ``(N,)``: all a top-label calibration measure sees of a prediction.

    :param probs: predicted probabilities ``(N, C)``.
    :param labels: true classes ``(N,)``.
    """
    p, y = _predictions(probs, labels)
    return p.max(1).astype(np.float64), (p.argmax(1) == y).astype(np.float64)


def reliability_curve(probs, labels, n_bins: int = 15,
                      binning: str = "equal-width") -> ReliabilityCurve:
    """Bin the top-label confidences and report per-bin confidence, accuracy and count.

    :param probs: predicted probabilities ``(N, C)``.
    :param labels: true classes ``(N,)``.
    :param n_bins: number of bins (15 is the torchmetrics default).
    :param binning: ``"equal-width"`` (torchmetrics' convention, see the module docstring) or
        ``"equal-mass"``.
    """
    p, y = _predictions(probs, labels)
    confidence = p.max(1)  # (N,) in the precision of probs
    return reliability_curve_from_confidence(confidence, p.argmax(1) == y, n_bins, binning)


def reliability_curve_from_confidence(confidence, correct, n_bins: int = 15,
                                      binning: str = "equal-width") -> ReliabilityCurve:
    """:func:`reliability_curve` from top-label confidences ``(N,)`` in ``[0, 1]`` and whether
    each top label was right ``(N,)`` (all a top-label curve depends on; cheap to resample)."""
    n_bins = check_n_bins(n_bins)
    _check_binning(binning)
    confidence = np.asarray(confidence)
    if confidence.dtype not in (np.float32, np.float64):
        confidence = confidence.astype(np.float64)
    correct = np.asarray(correct).astype(np.float64)
    if confidence.ndim != 1 or confidence.shape != correct.shape or confidence.size == 0:
        raise ValueError(f"confidence and correct must be non-empty 1-D arrays of one length, "
                         f"got shapes {confidence.shape} and {correct.shape}")
    if not np.all((confidence >= 0) & (confidence <= 1)):
        raise ValueError("confidence must lie in [0, 1]")
    if binning == "equal-width":
        edges = _equal_width_edges(n_bins, confidence.dtype)
        index = np.searchsorted(edges, confidence, side="right") - 1  # bucketize(right=True) - 1
        index = np.clip(index, 0, n_bins - 1)
        edges = edges.astype(np.float64)
    else:
        index = equal_mass_bin_index(confidence, n_bins)
        ordered = np.sort(confidence.astype(np.float64))
        starts = np.cumsum(np.bincount(index, minlength=n_bins))[:-1]  # first sample of bin j+1
        inner = np.ones(n_bins - 1)
        has_both = (starts > 0) & (starts < len(ordered))
        inner[has_both] = (ordered[starts[has_both] - 1] + ordered[starts[has_both]]) / 2
        edges = np.concatenate([[0.0], inner, [1.0]])
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence.astype(np.float64), n_bins) / count
        accuracy = np.bincount(index, correct, n_bins) / count
    return ReliabilityCurve(mean_confidence, accuracy, count, edges, binning)


def expected_calibration_error(probs, labels, n_bins: int = 15,
                               binning: str = "equal-width") -> float:
    """Top-label expected calibration error ``sum_j (n_j / N) |acc_j - conf_j|`` (a fraction in
    ``[0, 1]``). See the module docstring for the bin convention.

    :param probs: predicted probabilities ``(N, C)``.
    :param labels: true classes ``(N,)``.
    :param n_bins: number of bins.
    :param binning: ``"equal-width"`` or ``"equal-mass"``.
    """
    return curve_calibration_error(reliability_curve(probs, labels, n_bins, binning))


def curve_calibration_error(curve: ReliabilityCurve) -> float:
    """The expected calibration error of a reliability curve: its bins' gaps, count-weighted."""
    filled = curve.count > 0
    weights = curve.count[filled] / curve.count.sum()
    return float(np.sum(weights * curve.calibration_gap[filled]))


def curve_maximum_calibration_error(curve: ReliabilityCurve) -> float:
    """The largest gap ``|acc_j - conf_j|`` of a reliability curve's non-empty bins."""
    return float(np.max(curve.calibration_gap[curve.count > 0]))


def maximum_calibration_error(probs, labels, n_bins: int = 15,
                              binning: str = "equal-width") -> float:
    """Top-label maximum calibration error ``max_j |acc_j - conf_j|`` over non-empty bins."""
    return curve_maximum_calibration_error(reliability_curve(probs, labels, n_bins, binning))


def brier_score(probs, labels) -> float:
    """Multiclass Brier score: mean over samples of ``sum_c (p_c - onehot(label)_c)^2``, in
    ``[0, 2]``."""
    p, y = _predictions(probs, labels)
    p = p.astype(np.float64)
    target = np.zeros_like(p)
    target[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - target) ** 2, axis=1)))


def negative_log_likelihood(probs, labels) -> float:
    """Mean ``-log p[label]`` in nats (``inf`` when a true class has probability 0)."""
    p, y = _predictions(probs, labels)
    with np.errstate(divide="ignore"):
        return float(-np.mean(np.log(p[np.arange(len(y)), y].astype(np.float64))))


def classwise_residual_sums(probs, labels, n_bins: int = 15, groups=None,
                            n_groups: int | None = None) -> np.ndarray:
    """``sum_i (onehot(label_i)_k - p_ik)`` over the predictions ``i`` of each group whose
    probability of class ``k`` falls into equal-width bin ``b``: an array ``(G, C, n_bins)``.

    The sufficient statistic of :func:`classwise_calibration_error` (summing over groups gives
    the data's), so a bootstrap over groups (e.g. windows) needs no pass over ``(N, C)``.

    :param probs: predicted probabilities ``(N, C)``.
    :param labels: true classes ``(N,)``.
    :param n_bins: equal-width bins per class (the convention of the module docstring).
    :param groups: group of each prediction ``(N,)`` in ``[0, n_groups)``; ``None``: one group.
    :param n_groups: number of groups (default ``groups.max() + 1``).
    """
    p, y = _predictions(probs, labels)
    n_bins = check_n_bins(n_bins)
    n, n_classes = p.shape
    if groups is None:
        groups, n_groups = np.zeros(n, dtype=np.int64), 1
    else:
        groups = label_array(groups, "groups", n_classes=n_groups)
        check_same_length(probs=p, groups=groups)
        n_groups = int(groups.max()) + 1 if n_groups is None else n_groups
    edges = _equal_width_edges(n_bins, p.dtype)
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)  # (N, C)
    cell = (groups[:, None] * n_classes + np.arange(n_classes)) * n_bins + index  # (N, C)
    residual = -p.astype(np.float64)
    residual[np.arange(n), y] += 1.0  # onehot - p
    sums = np.bincount(cell.ravel(), residual.ravel(), n_groups * n_classes * n_bins)
    return sums.reshape(n_groups, n_classes, n_bins)


def classwise_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Class-wise ECE (Kull et al. 2019): the binned ECE of every class's probability against
    that class's indicator, averaged over the ``C`` classes,

        ``(1 / C) sum_k sum_b (|B_kb| / N) |freq_kb(label = k) - mean_kb(p_k)|``,

    with ``B_kb`` the predictions whose ``p_k`` falls into equal-width bin ``b`` (the
    convention of the module docstring). Every class counts, also one that never occurs (it
    adds its mean probability): with a large vocabulary the value shrinks like ``1 / C``.

    :param probs: predicted probabilities ``(N, C)``.
    :param labels: true classes ``(N,)``.
    :param n_bins: equal-width bins per class (15, as for the ECE).

    References: *Beyond temperature scaling: Obtaining well-calibrated multiclass probabilities
    with Dirichlet calibration*, Kull et al. (NeurIPS 2019): "classwise-ECE".
    """
    sums = classwise_residual_sums(probs, labels, n_bins)[0]  # (C, n_bins)
    n = len(np.asarray(labels))
    return float(np.abs(sums).sum() / (sums.shape[0] * n))


def squared_calibration_error_from_confidence(confidence, correct, n_bins: int = 15,
                                              debiased: bool = True) -> float:
    """:func:`squared_calibration_error` from top-label confidences and outcomes ``(N,)``."""
    n_bins = check_n_bins(n_bins)
    f = float_array(confidence, "confidence", ndims=(1,))
    y = float_array(correct, "correct", ndims=(1,))
    check_same_length(confidence=f, correct=y)
    if np.any((f < 0) | (f > 1)):
        raise ValueError("confidence must lie in [0, 1]")
    if np.any((y != 0) & (y != 1)):
        raise ValueError("correct must hold 0 or 1 (whether the top label is right)")
    index = equal_mass_bin_index(f, n_bins)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    filled = count > 0
    accuracy = np.bincount(index, y, n_bins)[filled] / count[filled]
    gap = accuracy - np.bincount(index, f, n_bins)[filled] / count[filled]
    terms = gap ** 2
    if debiased:
        several = count[filled] > 1
        variance = np.zeros_like(terms)
        variance[several] = (accuracy * (1 - accuracy))[several] / (count[filled][several] - 1)
        terms = np.where(several, terms - variance, 0.0)
    return float(np.sum(count[filled] / len(f) * terms))


def squared_calibration_error(probs, labels, n_bins: int = 15, debiased: bool = True) -> float:
    """Top-label squared (l2) calibration error with equal-mass bins, debiased as in Kumar,
    Liang & Ma (2019):

        ``sum_j (n_j / N) [(acc_j - conf_j)^2 - acc_j (1 - acc_j) / (n_j - 1)]``,

    bins with fewer than two predictions adding 0. The plug-in ``(acc_j - conf_j)^2``
    overestimates the squared gap by the variance of ``acc_j``, ``mu_j (1 - mu_j) / n_j``; the
    subtracted term is that variance's unbiased estimate, so a calibrated predictor scores
    about 0 instead of about ``n_bins * mean(mu (1 - mu)) / N``. This is the *squared* error:
    the paper's l2-CE is its square root (after clipping at 0). Bins follow
    :func:`~bayes_router.core.arrays.equal_mass_bin_index` (ties may straddle a boundary; the
    paper's code keeps tied confidences in one bin).

    .. warning:: The debiased value can be negative (it is unbiased for a non-negative
        quantity); the plug-in (``debiased=False``) is biased upward.

    :param probs: predicted probabilities ``(N, C)``.
    :param labels: true classes ``(N,)``.
    :param n_bins: equal-mass bins (15, as for the ECE).
    :param debiased: subtract the variance term (default); ``False`` gives the plug-in.

    References: *Verified Uncertainty Calibration*, Kumar, Liang, Ma (NeurIPS 2019): the
    debiased estimator of the squared calibration error with equal-mass bins.
    """
    return squared_calibration_error_from_confidence(*top_label_outcomes(probs, labels), n_bins,
                                                     debiased)


# -------------------------------------------------------------------------------- bootstrap


def check_bootstrap(n_boot, level: float) -> None:
    """The options every bootstrap of this package shares: ``n_boot`` an integer >= 1 and the
    interval's ``level`` in ``(0, 1)``."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")


def bootstrap_ci(metric: Callable[..., float], *arrays, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """Point estimate and percentile-bootstrap interval of ``metric(*arrays)``.

    Rows (the first axis) of all arrays are resampled jointly, with replacement, ``n_boot`` times.
    Bind extra arguments with :func:`functools.partial`, e.g.
    ``bootstrap_ci(partial(expected_calibration_error, n_bins=10), probs, labels)``.

    .. warning:: The percentile interval assumes the metric is roughly unbiased under resampling.
        Binned calibration errors are biased upward on resamples (duplicated rows add noise), so
        for them the interval can sit above, and even exclude, the point estimate.

    :param metric: a function of the arrays returning a float.
    :param arrays: arrays or tensors sharing the length of their first axis.
    :param n_boot: number of bootstrap resamples.
    :param level: coverage of the interval, in ``(0, 1)``.
    :param seed: seed of the resampling generator.
    :return: ``(point, low, high)``.
    """
    if not arrays:
        raise ValueError("arrays: bootstrap_ci needs at least one array to resample")
    check_bootstrap(n_boot, level)
    data = [to_numpy(array, f"arrays[{i}]") for i, array in enumerate(arrays)]
    for i, array in enumerate(data):
        if array.ndim == 0:
            raise ValueError(f"arrays[{i}] must have a first (row) axis, got a scalar")
    n_rows = check_same_length(**{f"arrays[{i}]": array for i, array in enumerate(data)})
    if n_rows == 0:
        raise ValueError("arrays are empty: nothing to resample")
    point = float(metric(*data))
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot)
    for b in range(n_boot):
        rows = rng.integers(0, n_rows, n_rows)
        replicates[b] = metric(*(array[rows] for array in data))
    tail = (1.0 - level) / 2.0
    # order statistics without interpolation when a replicate is infinite (inf - inf is NaN)
    method = "linear" if np.all(np.isfinite(replicates)) else "inverted_cdf"
    low, high = np.quantile(replicates, [tail, 1.0 - tail], method=method)
    return point, float(low), float(high)
