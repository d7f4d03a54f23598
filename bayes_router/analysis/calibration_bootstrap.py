"""Calibration of a predictive with bootstrap intervals over windows of tokens.

The bootstrap resamples per-token summaries (top-label confidence, correctness, Brier term, NLL)
instead of the ``(N, V)`` probabilities, so a resample never copies the vocabulary axis; the
metrics of the summaries are the public metrics of
:mod:`bayes_router.analysis.calibration_metrics` (the same reliability curves and calibration
errors), which the tests check number for number. The class-wise ECE resamples per-window sums
of its bins (:func:`~bayes_router.analysis.calibration_metrics.classwise_residual_sums`), the
smooth ECE weighs tokens by their window's multiplicity
(:mod:`~bayes_router.analysis.smooth_calibration`); every interval of one summary uses the same
resampled windows.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np

from bayes_router.analysis.calibration_metrics import (
    ReliabilityCurve,
    bootstrap_ci,
    brier_score,
    classwise_calibration_error,
    classwise_residual_sums,
    curve_calibration_error,
    curve_maximum_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_curve,
    reliability_curve_from_confidence,
    squared_calibration_error_from_confidence,
)
from bayes_router.analysis.smooth_calibration import smooth_calibration_summary

logger = logging.getLogger(__name__)

CALIBRATION_BINS = 15
#: Largest ``windows x classes x bins`` array of per-window class-wise sums the bootstrap of
#: the class-wise ECE keeps (80 MB of float64); above it the interval is left out.
CLASSWISE_BOOTSTRAP_CELLS = 10_000_000

#: The calibration metrics of a predictive ``(probs (N, C), labels (N,))``.
CALIBRATION_METRICS = {
    "ece": partial(expected_calibration_error, n_bins=CALIBRATION_BINS),
    "ece_equal_mass": partial(expected_calibration_error, n_bins=CALIBRATION_BINS,
                              binning="equal-mass"),
    "mce": partial(maximum_calibration_error, n_bins=CALIBRATION_BINS),
    "brier": brier_score,
    "nll": negative_log_likelihood,
}


def token_summary(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token top-label confidence, correctness, Brier term and NLL: everything the
    calibration metrics depend on, so that bootstrap resamples need not copy ``(N, V)``."""
    confidence = probs.max(-1)
    rows = np.arange(len(labels))
    correct = probs.argmax(-1) == labels
    brier = np.square(probs.astype(np.float64)).sum(-1) - 2 * probs[rows, labels] + 1.0
    with np.errstate(divide="ignore"):
        nll = -np.log(probs[rows, labels].astype(np.float64))
    return {"confidence": confidence, "correct": correct, "brier": brier, "nll": nll}


def summary_metric(name: str):
    """Metric ``name`` as a function of windows of the per-token summary arrays."""
    def metric(confidence, correct, brier, nll):
        if name == "brier":
            return float(brier.mean())
        if name == "nll":
            return float(nll.mean())
        binning = "equal-mass" if name == "ece_equal_mass" else "equal-width"
        curve = reliability_curve_from_confidence(confidence.reshape(-1), correct.reshape(-1),
                                                  CALIBRATION_BINS, binning)
        if name == "mce":
            return curve_maximum_calibration_error(curve)
        return curve_calibration_error(curve)
    return metric


def curve_dict(curve: ReliabilityCurve) -> dict:
    return {"confidence": curve.confidence, "accuracy": curve.accuracy, "count": curve.count,
            "edges": curve.edges, "binning": curve.binning}


def curve_from_dict(data: dict) -> ReliabilityCurve:
    """The :class:`ReliabilityCurve` stored by :func:`calibration_summary` in a JSON file."""
    return ReliabilityCurve(*(np.asarray(data[k], dtype=float) for k in
                              ("confidence", "accuracy", "count", "edges")), data["binning"])


def calibration_summary(probs: np.ndarray, labels: np.ndarray, window_len: int,
                        n_boot: int = 1000, seed: int = 0) -> dict:
    """Every metric of :data:`CALIBRATION_METRICS` with a bootstrap interval over windows, the
    top-1 accuracy and the equal-width and equal-mass reliability curves; and, each with its
    interval, the smooth ECE (``smooth_ece``, with its bandwidth, and the smoothed
    reliability diagram with a pointwise band, ``smooth_reliability``), the class-wise ECE
    (``classwise_ece``; no interval when the per-window sums would be too large, see
    :data:`CLASSWISE_BOOTSTRAP_CELLS`) and the debiased squared calibration error
    (``debiased_squared_ce``, 15 equal-mass bins).

    :param probs: predictive probabilities ``(N, V)``, ``N`` a multiple of ``window_len``.
    :param labels: next tokens ``(N,)``.
    """
    summary = [a.reshape(-1, window_len) for a in token_summary(probs, labels).values()]
    result = {}
    for name, metric in CALIBRATION_METRICS.items():
        _, low, high = bootstrap_ci(summary_metric(name), *summary, n_boot=n_boot, seed=seed)
        result[name] = {"value": metric(probs, labels), "low": low, "high": high}
    result["accuracy"] = float(np.mean(probs.argmax(-1) == labels))
    result["reliability"] = {
        binning: curve_dict(reliability_curve(probs, labels, CALIBRATION_BINS, binning))
        for binning in ("equal-width", "equal-mass")}
    confidence, correct = summary[0].astype(np.float64), summary[1].astype(np.float64)
    smooth = smooth_calibration_summary(confidence.reshape(-1), correct.reshape(-1), window_len,
                                        n_boot, seed=seed)
    result["smooth_ece"] = {k: smooth[k] for k in ("value", "low", "high", "bandwidth")}
    result["smooth_reliability"] = smooth["curve"]
    result["classwise_ece"] = _classwise_interval(probs, labels, window_len, n_boot, seed)
    _, low, high = bootstrap_ci(_debiased_squared_error, confidence, correct, n_boot=n_boot,
                                seed=seed)
    result["debiased_squared_ce"] = {
        "value": _debiased_squared_error(confidence, correct), "low": low, "high": high,
        "n_bins": CALIBRATION_BINS, "binning": "equal-mass"}
    return result


def _debiased_squared_error(confidence, correct) -> float:
    return squared_calibration_error_from_confidence(confidence.reshape(-1), correct.reshape(-1),
                                                     CALIBRATION_BINS, debiased=True)


def _classwise_interval(probs, labels, window_len: int, n_boot: int, seed: int) -> dict:
    """Class-wise ECE with a bootstrap interval over windows, from per-window bin sums."""
    value = classwise_calibration_error(probs, labels, CALIBRATION_BINS)
    n_windows = len(labels) // window_len
    if n_windows * probs.shape[1] * CALIBRATION_BINS > CLASSWISE_BOOTSTRAP_CELLS:
        logger.warning("class-wise ECE: %d windows x %d classes is too many for the window "
                       "bootstrap; reporting the value without an interval", n_windows,
                       probs.shape[1])
        return {"value": value, "low": None, "high": None}
    sums = classwise_residual_sums(probs, labels, CALIBRATION_BINS,
                                   np.arange(len(labels)) // window_len, n_windows)
    sums = sums.reshape(n_windows, -1)  # (W, C * bins)
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot)
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, n_windows, n_windows), minlength=n_windows)
        replicates[b] = np.abs(counts @ sums).sum() / (probs.shape[1] * len(labels))
    low, high = np.quantile(replicates, [0.025, 0.975])
    return {"value": value, "low": float(low), "high": float(high)}


def paired_difference(metric, probs_a: np.ndarray, probs_b: np.ndarray, labels: np.ndarray,
                      window_len: int, n_boot: int = 1000, seed: int = 0) -> dict:
    """``metric(b) - metric(a)`` with a paired bootstrap interval over windows."""
    name = next(k for k, v in CALIBRATION_METRICS.items() if v is metric)
    per_windows = summary_metric(name)
    a = [x.reshape(-1, window_len) for x in token_summary(probs_a, labels).values()]
    b = [x.reshape(-1, window_len) for x in token_summary(probs_b, labels).values()]
    _, low, high = bootstrap_ci(lambda *ab: per_windows(*ab[4:]) - per_windows(*ab[:4]),
                                *a, *b, n_boot=n_boot, seed=seed)
    return {"value": metric(probs_b, labels) - metric(probs_a, labels), "low": low,
            "high": high}
