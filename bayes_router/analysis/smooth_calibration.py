"""Smooth ECE and the smoothed reliability diagram of the top-label predictive.

The smooth expected calibration error (smECE) replaces the bins of the ECE by a Gaussian kernel:
the residual ``r_i = f_i - y_i`` of confidence ``f_i`` and outcome ``y_i`` (1 when the top label
is right) is kernel-smoothed over the confidence axis,

    ``r_sigma(t) = sum_i K_sigma(t, f_i) r_i / sum_i K_sigma(t, f_i)``,

and ``smECE_sigma = integral |r_sigma(t)| delta_sigma(t) dt / integral delta_sigma(t) dt``
with ``delta_sigma`` the kernel density of the confidences. ``K_sigma`` is a Gaussian reflected
at 0 and 1, so no mass leaks out of ``[0, 1]``. The bandwidth is the fixed point
``smECE_sigma = sigma`` (``smECE_sigma`` falls as ``sigma`` grows), found by bisection. The
paper shows that at this bandwidth the smECE is a consistent calibration measure: within
constant factors of the distance of the predictor to the nearest perfectly calibrated one.

**Parity with the reference implementation.** Everything follows ``relplot`` 1.0.3
(``relplot.smECE``, the authors' code) step for step, so the numbers agree to rounding
(tested): points are spread onto a grid of ``max(2000, round(20 / sigma)) // 2 + 1`` points by
linear binning, the grid is reflected at both ends and convolved with the Gaussian density
sampled on the grid (centred at 0.5), and the result is linearly interpolated at
``max(200, round(10 / sigma))`` evaluation points; ``1e-4`` is added to the smoothed weights
before dividing (so an empty stretch of the axis has residual 0); the bandwidth search tries
``sigma = 1``, then halves the interval ``[0, 1]`` ten times, keeping the upper end of the last
interval where ``sigma < smECE_sigma`` fails (or ``sigma < 0.001``). The smoothed reliability
curve is relplot's ``KernelSmoother`` of the outcomes at that bandwidth on 200 mesh points,
with the density of its ``kde``.

**Weights** are multiplicities: weight 2 on a point is the point twice. The window bootstrap
uses them to evaluate a resample without copying tokens.

References:
  - *Smooth ECE: Principled Reliability Diagrams via Kernel Smoothing*, Błasiok, Nakkiran
    (ICLR 2024; arXiv:2309.12236, 2023)
  - ``relplot``, https://github.com/apple/ml-calibration (reference implementation)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bayes_router.analysis.calibration_metrics import check_bootstrap, top_label_outcomes
from bayes_router.core.arrays import check_same_length, float_array
from bayes_router.core.validation import check_int

MESH_POINTS = 200  # relplot.config.smECE_mesh_pts and plot_mesh_pts
SMOOTHING_EPS = 1e-4  # added to the smoothed weights before dividing (relplot)
BANDWIDTH_FLOOR = 1e-3  # the search accepts any bandwidth below it (relplot's eps)
BANDWIDTH_HALVINGS = 10


# ----------------------------------------------------------------------------- the kernel


def _grid_size(bandwidth: float) -> int:
    """Grid points the kernel is discretised on (relplot's ``GaussianKernel.apply``)."""
    return max(2000, round(20 / bandwidth)) // 2 + 1


def _linear_binning(x: np.ndarray, values: np.ndarray, n_grid: int) -> np.ndarray:
    """Spread ``values`` at ``x`` onto ``linspace(0, 1, n_grid)``, each between its two
    neighbouring grid points in proportion to the distance (relplot's
    ``smooth_round_to_grid``)."""
    position = x * (n_grid - 1)
    left = position.astype(int).clip(0, n_grid - 2)
    frac = position - left
    return (np.bincount(left, (1 - frac) * values, n_grid)
            + np.bincount(left + 1, frac * values, n_grid))


def _reflected_gaussian(grid_values: np.ndarray, bandwidth: float) -> np.ndarray:
    """Convolve grid values with the Gaussian density of standard deviation ``bandwidth``,
    the grid mirrored at 0 and 1 (relplot's ``ReflectedGaussianKernel.convolve``)."""
    n = len(grid_values)
    t = np.linspace(0, 1, n)
    kernel = np.exp(-(t - 0.5) * (t - 0.5) / (2 * bandwidth ** 2))
    kernel /= np.sqrt(2 * np.pi) * bandwidth
    mirrored = np.concatenate([grid_values[:0:-1], grid_values, grid_values[-2::-1]])  # (3n-2,)
    return np.convolve(mirrored, kernel, "valid")[n // 2: n // 2 + n]


def _interpolate(at: np.ndarray, grid_values: np.ndarray) -> np.ndarray:
    """Linear interpolation of values on ``linspace(0, 1, n)`` at ``at`` (relplot's)."""
    n = len(grid_values)
    step = 1 / (n - 1)
    index = (at * (n - 1)).astype(int).clip(0, n - 2)
    residual = (at - index * step) / step
    return grid_values[index] * (1 - residual) + grid_values[index + 1] * residual


def _kernel_sum(x, values, at, bandwidth: float) -> np.ndarray:
    """``sum_i K_sigma(t, x_i) values_i`` at the points ``at``."""
    n_grid = _grid_size(bandwidth)
    return _interpolate(at, _reflected_gaussian(_linear_binning(x, values, n_grid), bandwidth))


def _kernel_regression(x, values, weights, at, bandwidth: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Nadaraya-Watson estimate of ``values`` at ``at`` and the smoothed weights it divides by
    (relplot's ``BaseKernelMixin.smooth``)."""
    density = _kernel_sum(x, weights, at, bandwidth) + SMOOTHING_EPS
    return _kernel_sum(x, weights * values, at, bandwidth) / density, density


def _smooth_error(confidence, correct, weights, bandwidth: float) -> float:
    """smECE at a fixed bandwidth (relplot's ``smooth_ece``)."""
    mesh = np.linspace(0, 1, max(round(10 / bandwidth), MESH_POINTS))
    residual, density = _kernel_regression(confidence, confidence - correct, weights, mesh,
                                           bandwidth)
    return float(np.sum(np.abs(residual) * density) / np.sum(density))


def _search_bandwidth(confidence, correct, weights) -> float:
    """The fixed point ``smECE_sigma = sigma`` by bisection (relplot's ``search_param``)."""
    def small_enough(sigma: float) -> bool:
        return sigma < BANDWIDTH_FLOOR or sigma < _smooth_error(confidence, correct, weights,
                                                                sigma)

    if small_enough(1.0):
        return 1.0
    high, low = 1.0, 0.0
    for _ in range(BANDWIDTH_HALVINGS):
        middle = (high + low) / 2
        if small_enough(middle):
            low = middle
        else:
            high = middle
    return high


# --------------------------------------------------------------------------------- inputs


def _outcomes(confidence, correct, weights=None):
    """Validated float64 ``confidence`` and ``correct`` in ``[0, 1]``, and ``weights``, all
    ``(N,)``."""
    f = float_array(confidence, "confidence", ndims=(1,))
    y = float_array(correct, "correct", ndims=(1,))
    if np.any((f < 0) | (f > 1)):
        raise ValueError("confidence must lie in [0, 1]")
    if np.any((y < 0) | (y > 1)):
        raise ValueError("correct must lie in [0, 1] (1 where the top label is right)")
    if weights is None:
        w = np.ones_like(f)
    else:
        w = float_array(weights, "weights", ndims=(1,))
        if np.any(w < 0) or not np.any(w > 0):
            raise ValueError("weights must be non-negative with a positive sum")
        check_same_length(confidence=f, weights=w)
    check_same_length(confidence=f, correct=y)
    return f, y, w


def _check_bandwidth(bandwidth) -> float:
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, np.floating)) \
            or not math.isfinite(bandwidth) or bandwidth <= 0:
        raise ValueError(f"bandwidth must be a positive number or None, got {bandwidth!r}")
    return float(bandwidth)


# -------------------------------------------------------------------------------- metrics


def smooth_calibration_bandwidth(confidence, correct, weights=None) -> float:
    """The bandwidth ``sigma`` at which ``smECE_sigma = sigma`` (to ``2^-10``), as chosen by
    ``relplot.smECE``; see the module docstring.

    :param confidence: top-label confidences ``(N,)`` in ``[0, 1]``.
    :param correct: outcomes ``(N,)`` in ``[0, 1]`` (1 where the top label is right).
    :param weights: multiplicities ``(N,)`` (default 1).
    """
    return _search_bandwidth(*_outcomes(confidence, correct, weights))


def smooth_calibration_error_from_confidence(confidence, correct, bandwidth: float | None = None,
                                             weights=None) -> float:
    """Smooth ECE (smECE) of top-label confidences and outcomes, in ``[0, 1]``.

    With ``bandwidth=None`` the bandwidth solves ``smECE_sigma = sigma`` as in
    ``relplot.smECE`` (the paper's definition); a number fixes it (``relplot.smECE_sigma``).

    :param confidence: top-label confidences ``(N,)`` in ``[0, 1]``.
    :param correct: outcomes ``(N,)`` in ``[0, 1]`` (1 where the top label is right).
    :param bandwidth: kernel standard deviation, or ``None`` for the self-consistent one.
    :param weights: multiplicities ``(N,)`` (default 1).

    References: *Smooth ECE: Principled Reliability Diagrams via Kernel Smoothing*, Błasiok,
    Nakkiran (2023).
    """
    f, y, w = _outcomes(confidence, correct, weights)
    sigma = _search_bandwidth(f, y, w) if bandwidth is None else _check_bandwidth(bandwidth)
    return _smooth_error(f, y, w, sigma)


def smooth_calibration_error(probs, labels, bandwidth: float | None = None) -> float:
    """Smooth ECE of the top-label predictive: confidence ``max_c p_c``, outcome whether the
    argmax is the label (``relplot.multiclass_logits_to_confidences`` with ``probs=True``).
    See :func:`smooth_calibration_error_from_confidence`.

    :param probs: predicted probabilities ``(N, C)``.
    :param labels: true classes ``(N,)``.
    """
    return smooth_calibration_error_from_confidence(*top_label_outcomes(probs, labels), bandwidth)


@dataclass(frozen=True)
class SmoothReliabilityCurve:
    """A smoothed reliability diagram on a mesh of confidences.

    :ivar mesh: confidences ``(M,)`` from 0 to 1.
    :ivar accuracy: kernel-smoothed accuracy ``E[correct | confidence]`` at the mesh ``(M,)``.
    :ivar density: kernel density of the confidences at the mesh ``(M,)``, as relplot
        computes it: it integrates to 1 for points inside ``(0, 1)`` and bandwidths below about
        0.2; a point exactly at 0 or 1 keeps half its mass, and wider kernels are cut at
        ``+-0.5``.
    :ivar bandwidth: the kernel's standard deviation.
    :ivar smooth_ece: the smooth ECE at that bandwidth.
    :ivar low: lower end of a pointwise bootstrap band of ``accuracy`` ``(M,)``, or ``None``.
    :ivar high: upper end of the band ``(M,)``, or ``None``.
    """

    mesh: np.ndarray
    accuracy: np.ndarray
    density: np.ndarray
    bandwidth: float
    smooth_ece: float
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.mesh)
        lengths = [len(self.accuracy), len(self.density)] + [
            len(band) for band in (self.low, self.high) if band is not None]
        if any(length != n for length in lengths):
            raise ValueError(f"curve: accuracy, density, low and high must have the mesh's "
                             f"length {n}, got {lengths}")
        if (self.low is None) != (self.high is None):
            raise ValueError("curve: give both low and high, or neither")


def _curve_arrays(f, y, w, bandwidth: float, mesh) -> tuple[np.ndarray, np.ndarray]:
    accuracy, _ = _kernel_regression(f, y, w, mesh, bandwidth)
    density = _kernel_sum(f, w / w.sum(), mesh, bandwidth)
    return accuracy, density


def smooth_reliability_curve(confidence, correct, bandwidth: float | None = None,
                             n_mesh: int = MESH_POINTS, weights=None) -> SmoothReliabilityCurve:
    """The smoothed reliability diagram: the kernel-smoothed accuracy and the density of the
    confidences on ``n_mesh`` points, at the smooth ECE's bandwidth (or ``bandwidth``), as
    relplot's ``prepare_rel_diagram`` draws it (its main line without bagging).

    :param confidence: top-label confidences ``(N,)`` in ``[0, 1]``.
    :param correct: outcomes ``(N,)`` in ``[0, 1]``.
    :param bandwidth: kernel standard deviation, or ``None`` for the smooth ECE's.
    :param n_mesh: mesh points, at least 2.
    :param weights: multiplicities ``(N,)`` (default 1).
    """
    f, y, w = _outcomes(confidence, correct, weights)
    check_int("n_mesh", n_mesh, least=2)
    sigma = _search_bandwidth(f, y, w) if bandwidth is None else _check_bandwidth(bandwidth)
    mesh = np.linspace(0, 1, n_mesh)
    accuracy, density = _curve_arrays(f, y, w, sigma, mesh)
    return SmoothReliabilityCurve(mesh, accuracy, density, sigma, _smooth_error(f, y, w, sigma))


# ------------------------------------------------------------------------- window bootstrap


def smooth_calibration_summary(confidence, correct, window_len: int, n_boot: int = 1000,
                               level: float = 0.95, seed: int = 0,
                               n_mesh: int = MESH_POINTS) -> dict:
    """Smooth ECE with a percentile-bootstrap interval over windows, and the smoothed
    reliability diagram with a pointwise band.

    Each resample draws ``W`` of the ``W`` windows with replacement (the same draws as
    :func:`~bayes_router.analysis.calibration_metrics.bootstrap_ci` with this ``seed``) and
    weighs every token by its window's multiplicity. The interval of the smooth ECE re-chooses
    the bandwidth on every resample (it is part of the estimator); the band of the curve keeps
    the bandwidth of the full data, as relplot's bagged band does.

    .. warning:: Like every calibration error, the smooth ECE is biased upward on resamples
        (duplicated windows add noise), so the interval can sit above the point estimate.

    :param confidence: top-label confidences ``(N,)``, ``N`` a multiple of ``window_len``, in
        window order.
    :param correct: outcomes ``(N,)``.
    :param window_len: tokens per window.
    :return: ``{"value", "low", "high", "bandwidth", "curve": {"mesh", "accuracy",
        "density", "low", "high"}}``.
    """
    f, y, w = _outcomes(confidence, correct)
    if isinstance(window_len, bool) or not isinstance(window_len, (int, np.integer)) \
            or window_len < 1 or len(f) % window_len:
        raise ValueError(f"window_len must be an integer >= 1 dividing the {len(f)} tokens, "
                         f"got {window_len!r}")
    check_bootstrap(n_boot, level)
    curve = smooth_reliability_curve(f, y, n_mesh=n_mesh)
    n_windows = len(f) // window_len
    rng = np.random.default_rng(seed)
    errors, curves = np.empty(n_boot), np.empty((n_boot, n_mesh))
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, n_windows, n_windows), minlength=n_windows)
        weights = np.repeat(counts, window_len).astype(np.float64)
        errors[b] = _smooth_error(f, y, weights, _search_bandwidth(f, y, weights))
        curves[b], _ = _kernel_regression(f, y, weights, curve.mesh, curve.bandwidth)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(errors, [tail, 1.0 - tail])
    band = np.quantile(curves, [tail, 1.0 - tail], axis=0)
    return {"value": curve.smooth_ece, "low": float(low), "high": float(high),
            "bandwidth": curve.bandwidth,
            "curve": {"mesh": curve.mesh, "accuracy": curve.accuracy, "density": curve.density,
                      "low": band[0], "high": band[1]}}


def smooth_curve_from_dict(data: dict) -> SmoothReliabilityCurve:
    """The :class:`SmoothReliabilityCurve` stored by :func:`smooth_calibration_summary`."""
    curve = data["curve"]
    arrays = {k: np.asarray(curve[k], dtype=float) for k in
              ("mesh", "accuracy", "density", "low", "high")}
    return SmoothReliabilityCurve(**arrays, bandwidth=float(data["bandwidth"]),
                                  smooth_ece=float(data["value"]))
