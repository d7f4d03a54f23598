"""Statistics of many independent gradient estimates: variance, signal-to-noise, efficiency.

Per parameter group (:func:`summarise_gradients`): the norm of the mean gradient, the total
variance (trace of the covariance), the median over parameters of the signal-to-noise ratio
``|mean| / std`` [1], seconds per estimate, the efficiency ``1 / (variance x seconds)``, and
(:func:`add_relative`) each of them relative to a reference estimator.

References

[1] `Tighter Variational Bounds are Not Necessarily Better`, Tom Rainforth, Adam R. Kosiorek,
    Tuan Anh Le, Chris J. Maddison, Maximilian Igl, Frank Wood, Yee Whye Teh (ICML 2018)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

#: The estimator every ratio is relative to.
REFERENCE = "reparam-mc"


@dataclass(frozen=True)
class GradientSummary:
    """Statistics of ``M`` gradient estimates of ``P`` parameters.

    :ivar int num_draws: ``M``.
    :ivar int num_parameters: ``P``.
    :ivar float mean_norm: Euclidean norm of the mean gradient.
    :ivar float total_variance: trace of the covariance, ``sum_p Var[g_p]`` (``ddof = 1``).
    :ivar float median_snr: median over parameters of ``|mean_p| / std_p``; a parameter whose
        draws are all equal and non-zero counts as ``inf``, one that is always zero is left out.
    :ivar int num_deterministic: parameters whose draws are all equal and non-zero.
    :ivar float seconds: seconds per estimate.
    :ivar float efficiency: ``1 / (total_variance * seconds)`` (``inf`` at zero variance).
    """

    num_draws: int
    num_parameters: int
    mean_norm: float
    total_variance: float
    median_snr: float
    num_deterministic: int
    seconds: float
    efficiency: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarise_gradients(draws, seconds: float = math.nan) -> GradientSummary:
    """Summarise gradient estimates ``draws`` of shape ``(M, P)`` (or ``(M,)`` for one parameter).

    :param seconds: seconds per estimate (``nan`` when unknown: the efficiency is then ``nan``).
    :raises ValueError: with fewer than two draws, or non-finite draws.
    """
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim == 1:
        draws = draws[:, None]
    if draws.ndim != 2:
        raise ValueError(f"draws must have shape (M, P), got {draws.shape}")
    if draws.shape[0] < 2:
        raise ValueError(f"need M >= 2 gradient draws to estimate a variance, got M = "
                         f"{draws.shape[0]}")
    if not np.isfinite(draws).all():
        raise ValueError("draws contain NaN or Inf")
    mean = draws.mean(0)
    variance = draws.var(0, ddof=1)
    std = np.sqrt(variance)
    stochastic = std > 0
    snr = np.full(mean.shape, np.inf)
    snr[stochastic] = np.abs(mean[stochastic]) / std[stochastic]
    active = stochastic | (mean != 0)
    median_snr = float(np.median(snr[active])) if active.any() else math.nan
    total_variance = float(variance.sum())
    if not (math.isfinite(seconds) and seconds > 0):
        efficiency = math.nan
    elif total_variance > 0:
        efficiency = 1.0 / (total_variance * seconds)
    else:
        efficiency = math.inf
    return GradientSummary(
        num_draws=int(draws.shape[0]), num_parameters=int(draws.shape[1]),
        mean_norm=float(np.linalg.norm(mean)), total_variance=total_variance,
        median_snr=median_snr, num_deterministic=int((~stochastic & (mean != 0)).sum()),
        seconds=float(seconds), efficiency=efficiency)


def snr_noise_floor(num_draws: int) -> float:
    """The median of ``|mean| / std`` over parameters whose true gradient is zero, for Gaussian
    draws: ``|t| / sqrt(M)`` has median ``0.674 / sqrt(M)`` (0.067 at ``M = 100``). A median SNR
    near it says the estimator does not resolve the gradient with ``M`` draws."""
    return 0.6745 / math.sqrt(num_draws)


def _ratio(value: float, reference: float) -> float:
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return math.nan
    return value / reference


def add_relative(results: dict, reference: str = REFERENCE) -> None:
    """Add ``relative[group]`` (variance, SNR, seconds and efficiency ratios to ``reference``) to
    every estimator of ``results`` (``name -> {"groups": {group: summary dict}}``), in place."""
    if reference not in results:
        return
    ref = results[reference]["groups"]
    for entry in results.values():
        entry["relative"] = {
            group: {f"{key}_ratio": _ratio(summary[key], ref[group][key])
                    for key in ("total_variance", "median_snr", "seconds", "efficiency")}
            for group, summary in entry["groups"].items() if group in ref
        }


# ------------------------------------------------------------------------------------------------
# the lab model and its parameter groups
