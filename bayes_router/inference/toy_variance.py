"""The gradient-variance lab on the conjugate toy, where the exact gradient is known: each
estimator's bias, z-scores and Hotelling statistic beside its variance."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import chi2

from bayes_router.inference.estimators import get_estimator
from bayes_router.inference.gradient_stats import REFERENCE, add_relative, summarise_gradients
from bayes_router.inference.toy import gradient_draws, toy_elbo_grad
from bayes_router.inference.variance import check_estimators, check_num_draws, particles_for

TOY_COUNTS = (6.0, 3.0, 1.0)
TOY_PRIOR = (0.5, 1.0, 1.5)
TOY_POINT = (2.0, 3.0, 1.5)


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
    a = torch.as_tensor(a, dtype=torch.float64)
    counts = torch.as_tensor(counts, dtype=torch.float64)
    prior = torch.as_tensor(prior, dtype=torch.float64)
    exact = toy_elbo_grad(a, counts, prior).numpy()
    results = {}
    for name in names:
        estimator = get_estimator(name)
        particles = particles_for(name, num_particles)
        warmup = estimator.warmup_steps
        gradient_draws(estimator, a, 2, counts, prior, num_particles=particles, seed=seed)
        start = time.perf_counter()
        draws = gradient_draws(estimator, a, num_draws, counts, prior, num_particles=particles,
                               batch_size=batch_size, warmup=warmup, seed=seed).numpy()
        seconds = (time.perf_counter() - start) / (num_draws + warmup * min(batch_size,
                                                                            num_draws))
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
