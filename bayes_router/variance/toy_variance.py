"""The gradient-variance lab on the conjugate toy, where the exact gradient is known: each
estimator's bias, z-scores and Hotelling statistic beside its variance
(:func:`toy_gradient_variance`), and how variance, SNR and cost scale with the number of
particles ``K`` (:func:`toy_variance_vs_particles`), with power-law slopes fitted by
:func:`fit_power_law` beside the asymptotic values of the papers (:data:`EXPECTED_SLOPES`).

References

[1] `Tighter Variational Bounds are Not Necessarily Better`, Tom Rainforth, Adam R. Kosiorek,
    Tuan Anh Le, Chris J. Maddison, Maximilian Igl, Frank Wood, Yee Whye Teh (ICML 2018)
[2] `Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives`, George Tucker,
    Dieterich Lawson, Shixiang Gu, Chris J. Maddison (ICLR 2019)
[3] `Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
    Inference`, Geoffrey Roeder, Yuhuai Wu, David Duvenaud (NeurIPS 2017)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import chi2

from bayes_router.inference.estimators import get_estimator
from bayes_router.variance.gradient_stats import REFERENCE, add_relative, summarise_gradients
from bayes_router.variance.lm_variance import (
    DEFAULT_PARTICLE_ESTIMATORS,
    check_estimators,
    check_num_draws,
    particles_for,
)
from bayes_router.variance.toy import gradient_draws, toy_elbo_grad

logger = logging.getLogger(__name__)

TOY_COUNTS = (6.0, 3.0, 1.0)
TOY_PRIOR = (0.5, 1.0, 1.5)
TOY_POINT = (2.0, 3.0, 1.5)

#: the summaries of the particle sweep whose slopes get a bootstrap interval
BOOTSTRAPPED = ("total_variance", "median_snr", "mean_norm")
#: the summaries of the particle sweep whose log-log slopes against ``K`` are fitted
FITTED = BOOTSTRAPPED + ("seconds", "efficiency")
_ELBO_STYLE = {"total_variance": -1.0, "median_snr": 0.5, "mean_norm": 0.0}
#: Asymptotic log-log slopes against the number of particles ``K`` of the guide gradient.
#: An ELBO estimator averages ``K`` independent unbiased estimates: variance ``K^-1``, mean
#: fixed. ``iwae`` [1, Theorem 1]: mean ``O(1/K)``, standard deviation ``O(1/sqrt(K))``, SNR
#: ``O(1/sqrt(K))``. ``dreg`` [2]: the same mean, SNR ``O(sqrt(K))``, so variance ``O(K^-3)``.
EXPECTED_SLOPES = {
    **{name: _ELBO_STYLE for name in ("reparam-mc", "reparam-analytic", "score",
                                       "score-baseline", "score-nn-baseline", "stl",
                                       "naive-gamma", "rsvi")},
    "iwae": {"total_variance": -1.0, "median_snr": -0.5, "mean_norm": -1.0},
    "dreg": {"total_variance": -3.0, "median_snr": 0.5, "mean_norm": -1.0},
}
#: path-derivative estimators, whose every draw is zero at the exact posterior [2, 3]
ZERO_AT_POSTERIOR = ("stl", "dreg")


def _as_toy(a, counts, prior) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(counts, dtype=torch.float64),
            torch.as_tensor(prior, dtype=torch.float64))


def _timed_draws(estimator, a, num_draws: int, counts, prior, particles: int, batch_size: int,
                 seed: int) -> tuple[np.ndarray, float]:
    """``num_draws`` gradient draws and the seconds per estimate, amortised over the
    vectorised replicas and the discarded warm-up passes (after one untimed call)."""
    warmup = estimator.warmup_steps
    gradient_draws(estimator, a, 2, counts, prior, num_particles=particles, seed=seed)
    start = time.perf_counter()
    draws = gradient_draws(estimator, a, num_draws, counts, prior, num_particles=particles,
                           batch_size=batch_size, warmup=warmup, seed=seed).numpy()
    seconds = (time.perf_counter() - start) / (num_draws + warmup * min(batch_size, num_draws))
    return draws, seconds


def toy_gradient_variance(estimators: Sequence[str] | None = None, *, num_draws: int = 20000,
                          a=TOY_POINT, counts=TOY_COUNTS, prior=TOY_PRIOR,
                          num_particles: int | None = None, batch_size: int = 2000,
                          seed: int = 0) -> dict:
    """Each estimator's draws on the conjugate toy against the exact ELBO gradient.

    Per estimator: the summary of :func:`summarise_gradients`, the mean and exact gradients,
    the bias ``mean - exact``, its z-scores ``bias / (std / sqrt(M))``, and Hotelling's
    statistic ``M d^T S^-1 d`` with its chi-square p-value (small for a biased estimator, or by
    chance once in a thousand at ``p < 0.001``). Seconds per estimate are amortised over
    vectorised replicas (``batch_size`` estimates per pass).
    """
    names = check_estimators(estimators)
    if REFERENCE not in names:
        names = [REFERENCE] + names
    num_draws = check_num_draws(num_draws)
    a, counts, prior = _as_toy(a, counts, prior)
    exact = toy_elbo_grad(a, counts, prior).numpy()
    results = {}
    for name in names:
        estimator = get_estimator(name)
        particles = particles_for(name, num_particles)
        draws, seconds = _timed_draws(estimator, a, num_draws, counts, prior, particles,
                                      batch_size, seed)
        summary = summarise_gradients(draws, seconds)
        mean = draws.mean(0)
        covariance = np.cov(draws.T)
        standard_error = draws.std(0, ddof=1) / math.sqrt(num_draws)
        bias = mean - exact
        hotelling = float(num_draws * bias @ np.linalg.solve(covariance, bias))
        results[name] = {
            "num_particles": particles, "unbiased": estimator.unbiased,
            "groups": {"a": summary.to_dict()},
            "mean": mean.tolist(), "exact": exact.tolist(), "bias": bias.tolist(),
            "standard_error": standard_error.tolist(),
            "z": (bias / standard_error).tolist(),
            "max_abs_z": float(np.max(np.abs(bias / standard_error))),
            "hotelling": hotelling,
            "p_value": float(chi2.sf(hotelling, df=len(exact))),
        }
    add_relative(results)
    return {"estimators": results, "reference": REFERENCE, "num_draws": num_draws,
            "a": a.tolist(), "counts": counts.tolist(), "prior": prior.tolist(),
            "exact_gradient": exact.tolist()}


# ------------------------------------------------------------------------------------------------
# power laws in the number of particles


@dataclass(frozen=True)
class PowerLawFit:
    """Least-squares fit of ``log y = intercept + slope log x``.

    :ivar float slope: the exponent of ``y ∝ x^slope``.
    :ivar float intercept: ``log y`` at ``x = 1``.
    :ivar float standard_error: the slope's standard error from the residuals,
        ``sqrt(RSS / (n - 2) / sum (log x - mean)^2)``: zero on an exact power law, ``nan``
        with two points. It measures the departure from a power law as well as the noise.
    :ivar int num_points: ``n``, the points fitted.
    :ivar interval: ``(low, high)``, a percentile interval of the slope over bootstrap
        resamples of the gradient draws (``None`` without a bootstrap); the sampling noise of
        the draws alone.
    :ivar float level: the interval's coverage.
    :ivar float bootstrap_standard_error: the standard deviation of the bootstrap slopes.
    """

    slope: float
    intercept: float
    standard_error: float
    num_points: int
    interval: tuple[float, float] | None = None
    level: float | None = None
    bootstrap_standard_error: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _log_points(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-d of one length, got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and (x > 0).all()):
        raise ValueError(f"x must hold positive finite values, got {x.tolist()}")
    if not (np.isfinite(y).all() and (y > 0).all()):
        raise ValueError(f"y must hold positive finite values, got {y.tolist()}")
    if len(np.unique(x)) < 2:
        raise ValueError(f"x must hold at least two distinct values, got {x.tolist()}")
    return np.log(x), np.log(y)


def _slopes(log_x: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """Least-squares slopes of each row of ``log_y (..., n)`` on ``log_x (n,)``."""
    centred = log_x - log_x.mean()
    return (log_y - log_y.mean(-1, keepdims=True)) @ centred / (centred @ centred)


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLawFit:
    """Fit ``y = exp(intercept) x^slope`` by least squares of ``log y`` on ``log x``.

    :raises ValueError: for non-positive or non-finite values, shapes that differ, or fewer
        than two distinct ``x``.
    """
    log_x, log_y = _log_points(x, y)
    slope = float(_slopes(log_x, log_y))
    intercept = float(log_y.mean() - slope * log_x.mean())
    n = len(log_x)
    if n > 2:
        residuals = log_y - intercept - slope * log_x
        spread = float(((log_x - log_x.mean()) ** 2).sum())
        standard_error = math.sqrt(float(residuals @ residuals) / (n - 2) / spread)
    else:
        standard_error = math.nan
    return PowerLawFit(slope=slope, intercept=intercept, standard_error=standard_error,
                       num_points=n)


def local_slopes(x: Sequence[float], y: Sequence[float]) -> list[float | None]:
    """``log(y[i+1] / y[i]) / log(x[i+1] / x[i])`` between neighbouring points (``None`` where
    either ``y`` is not positive and finite)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = np.diff(np.log(y)) / np.diff(np.log(x))
    return [float(v) if np.isfinite(v) else None for v in slopes]


def bootstrap_summaries(draws: np.ndarray, num_resamples: int,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """:data:`BOOTSTRAPPED` summaries (as :func:`summarise_gradients`) of ``num_resamples``
    resamples with replacement of the rows of ``draws (M, P)``: ``key -> (num_resamples,)``."""
    draws = np.asarray(draws, dtype=np.float64)
    num_draws = draws.shape[0]
    centre = draws.mean(0)
    centred = draws - centre  # resampled moments without cancellation
    out = {key: np.empty(num_resamples) for key in BOOTSTRAPPED}
    chunk = max(1, 2_000_000 // num_draws)
    for start in range(0, num_resamples, chunk):
        rows = slice(start, min(start + chunk, num_resamples))
        counts = rng.multinomial(num_draws, np.full(num_draws, 1.0 / num_draws),
                                 size=rows.stop - rows.start).astype(np.float64)  # (B, M)
        shift = counts @ centred / num_draws  # (B, P)
        variance = (counts @ centred**2 / num_draws - shift**2) * num_draws / (num_draws - 1)
        mean = centre + shift
        std = np.sqrt(np.clip(variance, 0.0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(std > 0, np.abs(mean) / std, np.inf)
        out["total_variance"][rows] = variance.sum(-1)
        out["median_snr"][rows] = np.median(snr, -1)
        out["mean_norm"][rows] = np.linalg.norm(mean, axis=-1)
    return out


def _fit_with_interval(particles: Sequence[int], values: Sequence[float],
                       resampled: np.ndarray | None, level: float) -> PowerLawFit | None:
    """:func:`fit_power_law` over the usable points (positive, finite), with the percentile
    interval of the slopes of the bootstrap rows ``resampled (B, n)``; ``None`` below two."""
    x, y = np.asarray(particles, dtype=float), np.asarray(values, dtype=float)
    usable = np.isfinite(y) & (y > 0)
    if len(np.unique(x[usable])) < 2:
        return None
    fit = fit_power_law(x[usable], y[usable])
    if resampled is None:
        return fit
    rows = resampled[:, usable]
    rows = rows[(np.isfinite(rows) & (rows > 0)).all(-1)]
    if len(rows) < 2:
        return fit
    slopes = _slopes(np.log(x[usable]), np.log(rows))
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(slopes, [tail, 100.0 - tail])
    return dataclasses.replace(fit, interval=(float(low), float(high)), level=level,
                               bootstrap_standard_error=float(slopes.std(ddof=1)))


def check_particles(particles: Sequence[int]) -> list[int]:
    """The distinct particle counts in ascending order.

    :raises ValueError: unless all are integers ``>= 1`` and there is at least one."""
    if any(isinstance(k, bool) or int(k) != k for k in particles):
        raise ValueError(f"particles must be integers >= 1, got {list(particles)}")
    counts = sorted({int(k) for k in particles})
    if not counts or counts[0] < 1:
        raise ValueError(f"particles must be integers >= 1, got {list(particles)}")
    return counts


def check_num_bootstrap(num_bootstrap: int) -> int:
    """:raises ValueError: unless ``num_bootstrap`` is an integer ``>= 0``."""
    if isinstance(num_bootstrap, bool) or not isinstance(num_bootstrap, int) or \
            num_bootstrap < 0:
        raise ValueError(f"num_bootstrap must be an integer >= 0, got {num_bootstrap!r}")
    return num_bootstrap


def toy_variance_vs_particles(estimators: Sequence[str] | None = DEFAULT_PARTICLE_ESTIMATORS,
                              particles: Sequence[int] = (2, 8, 32, 128), *,
                              num_draws: int = 20000, a=TOY_POINT, counts=TOY_COUNTS,
                              prior=TOY_PRIOR, batch_size: int = 2000,
                              num_bootstrap: int = 400, level: float = 0.95,
                              posterior_draws: int = 1000, seed: int = 0) -> dict:
    """Variance, SNR and cost of the toy's guide gradient at each number of particles ``K``,
    and each estimator's power-law slopes against ``K``.

    At each ``K`` every estimator makes ``num_draws`` estimates of ``K`` vectorised particles
    at the guide concentration ``a``, from a torch seed drawn from ``(seed, K)`` (the same for
    every estimator: common random numbers). Counts below an estimator's minimum are recorded
    as skipped. Per estimator and :data:`FITTED` summary, :func:`fit_power_law` of the summary
    on ``K``; the slopes of :data:`BOOTSTRAPPED` summaries carry a ``level`` percentile
    interval over ``num_bootstrap`` resamples of the draws at every ``K`` (none at 0), and
    their :func:`local_slopes` between neighbouring ``K`` show where the power law sets in.

    At the exact posterior ``a = prior + counts`` every estimator then makes
    ``posterior_draws`` estimates per ``K`` (0: skip), whose total variance and largest
    absolute value are recorded: those of :data:`ZERO_AT_POSTERIOR` are zero to rounding.

    The toy's prior is fixed, so the model has no parameter: only the guide gradient (with
    respect to ``a``) is measured.

    :returns: ``{"particles", "num_draws", "num_bootstrap", "level", "a", "counts", "prior",
        "estimators": {name: [{"num_particles", "unbiased", "groups": {"a": summary}} or
        {"skipped": reason}]}, "slopes": {name: {key: fit dict or None}},
        "local_slopes": {name: {key: [...]}}, "expected_slopes": {name: {key: slope}},
        "at_posterior": {"a", "num_draws", "estimators": {name: [{"total_variance",
        "max_abs"} or {"skipped": reason}]}}}``, each estimator's lists aligned with
        ``particles``; ``local_slopes`` lie between neighbouring measured ``K``.
    :raises ValueError: for an unknown estimator, ``particles`` not integers ``>= 1``,
        ``num_draws < 2``, ``num_bootstrap < 0``, ``posterior_draws`` neither 0 nor ``>= 2``,
        or ``level`` outside ``(0, 1)``.
    """
    names = check_estimators(estimators)
    particles = check_particles(particles)
    num_draws = check_num_draws(num_draws)
    num_bootstrap = check_num_bootstrap(num_bootstrap)
    if posterior_draws != 0:
        check_num_draws(posterior_draws)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    a, counts, prior = _as_toy(a, counts, prior)
    posterior = prior + counts
    rng = np.random.default_rng(seed)
    seeds = {k: int(np.random.SeedSequence([seed, k]).generate_state(1)[0]) for k in particles}
    table: dict[str, list] = {name: [] for name in names}
    at_posterior: dict[str, list] = {name: [] for name in names}
    slopes, expected = {}, {}
    local: dict[str, dict] = {name: {} for name in names}
    for name in names:
        estimator = get_estimator(name)
        usable, summaries, resampled = [], [], {key: [] for key in BOOTSTRAPPED}
        for k in particles:
            if k < estimator.min_particles:
                skipped = {"skipped": f"{name} needs num_particles >= "
                                      f"{estimator.min_particles}"}
                table[name].append(skipped)
                if posterior_draws:
                    at_posterior[name].append(dict(skipped))
                continue
            draws, seconds = _timed_draws(estimator, a, num_draws, counts, prior, k,
                                          batch_size, seeds[k])
            summary = summarise_gradients(draws, seconds).to_dict()
            table[name].append({"num_particles": k, "unbiased": estimator.unbiased,
                                "groups": {"a": summary}})
            usable.append(k)
            summaries.append(summary)
            if num_bootstrap:
                for key, values in bootstrap_summaries(draws, num_bootstrap, rng).items():
                    resampled[key].append(values)
            if posterior_draws:
                at = gradient_draws(estimator, posterior, posterior_draws, counts, prior,
                                    num_particles=k, batch_size=batch_size,
                                    seed=seeds[k]).numpy()
                at_posterior[name].append({"total_variance": float(at.var(0, ddof=1).sum()),
                                           "max_abs": float(np.abs(at).max())})
            logger.info("%s, K = %d: total variance %.3g, median SNR %.3g", name, k,
                        summary["total_variance"], summary["median_snr"])
        slopes[name] = {}
        for key in FITTED:
            values = [measured[key] for measured in summaries]
            rows = (np.stack(resampled[key], -1) if key in BOOTSTRAPPED and num_bootstrap
                    and usable else None)
            fit = _fit_with_interval(usable, values, rows, level) if usable else None
            slopes[name][key] = None if fit is None else fit.to_dict()
            if key in BOOTSTRAPPED:
                local[name][key] = local_slopes(usable, values)
        expected[name] = EXPECTED_SLOPES.get(name, {})
    result = {"particles": particles, "num_draws": num_draws, "num_bootstrap": num_bootstrap,
              "level": level, "a": a.tolist(), "counts": counts.tolist(),
              "prior": prior.tolist(), "estimators": table, "slopes": slopes,
              "local_slopes": local, "expected_slopes": expected}
    if posterior_draws:
        result["at_posterior"] = {"a": posterior.tolist(), "num_draws": posterior_draws,
                                  "estimators": at_posterior}
    return result


__all__ = [
    "EXPECTED_SLOPES",
    "PowerLawFit",
    "bootstrap_summaries",
    "fit_power_law",
    "local_slopes",
    "toy_gradient_variance",
    "toy_variance_vs_particles",
]
