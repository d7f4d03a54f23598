"""Commitment costs: the optimiser against a brute-force grid, independently measured numbers,
degenerate cases and input checks."""

import functools

import numpy as np
import pytest
from scipy.optimize import approx_fprime
from scipy.special import digamma, gammaln
from scipy.stats import dirichlet

from bayes_router.core.commitment import (
    CommitmentCost,
    _kl_gradient,
    commitment_cost,
    commitment_costs,
    floor_kl,
)

A_MIN = 0.05
LEVELS = ("argmax", 0.5, 0.9)
SEED_COSTS = np.array([1.0, 0.15, 0.30])  # full, local-small, local
SEED_PI = (1 / SEED_COSTS) / (1 / SEED_COSTS).sum()


def naive_kl(a: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``KL(Dir(a) || Dir(beta))`` for rows ``a (..., K)``, straight from the formula."""
    a0 = a.sum(-1)
    log_b_a = gammaln(a).sum(-1) - gammaln(a0)
    log_b_beta = gammaln(beta).sum() - gammaln(beta.sum())
    return log_b_beta - log_b_a + ((a - beta) * (digamma(a) - digamma(a0)[..., None])).sum(-1)


def commits(a: np.ndarray, target: int, level) -> np.ndarray:
    """Which rows of ``a (..., K)`` commit to ``target`` at ``level``."""
    if level == "argmax":
        return a[..., target] >= a.max(-1)
    return a[..., target] >= level * a.sum(-1)


def lattice(axes: list[np.ndarray]) -> np.ndarray:
    """All points of the product of ``axes``, ``(prod len, len(axes))``."""
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))


def refine(kl_of, best, best_kl, step, lower, rounds=30, width=9):
    """Pattern search in log space from ``best`` (value ``best_kl``): ``rounds`` times, the
    smallest ``kl_of(points)`` (``inf`` where inadmissible) on ``width`` points per axis spanning
    two steps either side of the best point so far (not below ``lower``), halving the step when
    that brings no improvement."""
    for _ in range(rounds):
        points = lattice([np.maximum(np.linspace(u - 2 * s, u + 2 * s, width), lo)
                          for u, s, lo in zip(best, step, lower)])
        values = kl_of(points)
        if values.min() < best_kl:
            best, best_kl = points[values.argmin()], values.min()
        else:
            step = step / 2
    return best_kl


def grid_search(kl_of, lower, upper, n):
    """:func:`refine` from the best of ``n`` points per axis from ``lower`` to ``upper``."""
    points = lattice([np.linspace(lo, upper, n) for lo in lower])
    values = kl_of(points)
    return refine(kl_of, points[values.argmin()], values.min(), (upper - lower) / (n - 1), lower)


def grid_minimum(beta, floor, target=None, level=None):
    """Brute-force minimum of the KL over admissible ``a`` committing to ``target`` at ``level``
    (only ``a >= floor`` when ``target`` is None): the smaller of a 3-D grid over ``log a`` and,
    since a cheaper guide off the commitment's boundary would be a minimum without it, a 2-D
    grid over the boundary (the other ``log a_j``; ``a_target`` makes the constraint tight)."""
    lower, upper = np.log(floor), np.log(100 * max(1.0, beta.sum()))
    coarse = _coarse_grid(tuple(beta), tuple(floor))
    ok = commits(coarse, target, level) if target is not None else slice(None)
    values = naive_kl(coarse[ok], beta)

    def kl_3d(u):
        a = np.exp(u)
        ok = commits(a, target, level) if target is not None else np.ones(len(a), bool)
        return np.where(ok, naive_kl(a, beta), np.inf)

    best = refine(kl_3d, np.log(coarse[ok][values.argmin()]), values.min(),
                  (upper - lower) / (COARSE_POINTS - 1), lower)
    if target is None:
        return best
    others = [j for j in range(len(beta)) if j != target]

    def kl_boundary(u):
        rest = np.exp(u)  # (N, K - 1)
        a_target = rest.max(-1) if level == "argmax" else level / (1 - level) * rest.sum(-1)
        a = np.insert(rest, target, np.maximum(a_target, floor[target]), axis=-1)
        return naive_kl(a, beta)

    return min(best, grid_search(kl_boundary, lower[others], upper, n=100))


COARSE_POINTS = 60


@functools.cache
def _coarse_grid(beta: tuple, floor: tuple) -> np.ndarray:
    """The ``COARSE_POINTS^3`` log-spaced concentrations ``a`` the 3-D search starts from."""
    upper = np.log(100 * max(1.0, sum(beta)))
    return np.exp(lattice([np.linspace(lo, upper, COARSE_POINTS) for lo in np.log(floor)]))


PRIORS = {
    "seed beta0=1": (SEED_PI, A_MIN),
    "seed beta0=0.1 (below the floor)": (0.1 * SEED_PI, A_MIN),
    "seed beta0=10": (10 * SEED_PI, A_MIN),
    "uniform": (np.full(3, 0.5), A_MIN),
    "seed parameterisation (floor = beta)": (SEED_PI, SEED_PI),
}


def test_naive_kl_matches_a_monte_carlo_estimate():
    a, beta = np.array([0.7, 0.45, 0.25]), SEED_PI
    x = dirichlet.rvs(a, size=200_000, random_state=np.random.default_rng(0))
    x = np.clip(x, 1e-300, None)
    x /= x.sum(-1, keepdims=True)
    log_ratio = dirichlet.logpdf(x.T, a) - dirichlet.logpdf(x.T, beta)
    standard_error = log_ratio.std() / np.sqrt(len(log_ratio))
    assert abs(log_ratio.mean() - naive_kl(a, beta)) < 4 * standard_error


@pytest.mark.parametrize("a", [np.array([0.7, 0.45, 0.25]), np.array([8.0, 0.06, 0.05])])
def test_kl_gradient_matches_finite_differences(a):
    numeric = approx_fprime(a, lambda x: naive_kl(x, SEED_PI), 1e-7)
    np.testing.assert_allclose(_kl_gradient(a, SEED_PI), numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", PRIORS)
def test_optimiser_matches_a_brute_force_grid(name):
    beta, floor = PRIORS[name]
    floor = np.broadcast_to(floor, beta.shape).astype(float)
    assert floor_kl(beta, floor) == pytest.approx(grid_minimum(beta, floor), abs=1e-7)
    costs = commitment_costs(beta, floor, LEVELS)
    for target in range(3):
        for j, level in enumerate(LEVELS):
            result = commitment_cost(beta, target, level, floor)
            grid = grid_minimum(beta, floor, target, level)
            assert result.kl <= grid + 1e-9, (target, level)
            assert result.kl == pytest.approx(grid, abs=1e-6), (target, level)
            assert costs[target, j] == pytest.approx(result.kl, abs=1e-9)
            a = result.concentration
            assert commits(a, target, level) and np.all(a >= floor)
            assert naive_kl(a, beta) == pytest.approx(result.kl, abs=1e-10)
            np.testing.assert_allclose(result.mean, a / a.sum())


#: Measured independently (beta0 = 1, seed costs, a_min = 0.05) by a grid search, which can only
#: overestimate a minimum: each exact cost lies at or below the measured one by less than 0.01.
MEASURED = [(0, "argmax", 0.86), (0, 0.5, 1.34), (0, 0.9, 3.36),
            (2, "argmax", 0.14), (2, 0.5, 0.22), (2, 0.9, 1.67)]


@pytest.mark.parametrize("target, level, measured", MEASURED)
@pytest.mark.parametrize("floor", [A_MIN, 1e-6])
def test_independently_measured_costs(target, level, measured, floor):
    kl = commitment_cost(SEED_PI, target, level, floor).kl
    assert measured - 0.01 < kl <= measured + 0.005


def test_a_target_the_prior_favours_costs_nothing():
    for target in range(3):
        uniform = commitment_cost(np.full(3, 0.5), target, "argmax", A_MIN)
        assert uniform.kl == 0.0 and uniform.feasible_at_prior
    for level in ("argmax", 0.5):  # pi_local_small = 0.61
        result = commitment_cost(SEED_PI, 1, level, A_MIN)
        assert result.kl == 0.0 and result.feasible_at_prior
        np.testing.assert_array_equal(result.concentration, SEED_PI)
    assert not commitment_cost(SEED_PI, 1, 0.9, A_MIN).feasible_at_prior


def test_a_floor_above_the_prior_costs_every_guide_something():
    beta = 0.1 * SEED_PI  # (0.009, 0.061, 0.030): two entries below a_min
    least = floor_kl(beta, A_MIN)
    assert least > 0.5
    costs = commitment_costs(beta, A_MIN)
    assert np.all(costs >= least - 1e-9)
    favoured = commitment_cost(beta, 1, "argmax", A_MIN)
    assert favoured.feasible_at_prior and favoured.kl == pytest.approx(least)
    assert floor_kl(beta, beta) == 0.0 and floor_kl(SEED_PI, A_MIN) == 0.0


@pytest.mark.parametrize("name", PRIORS)
def test_costs_grow_with_the_level(name):
    beta, floor = PRIORS[name]
    costs = commitment_costs(beta, floor, ("argmax", 0.5, 0.7, 0.9, 0.99))
    assert np.all(np.diff(costs, axis=1) >= -1e-9)
    assert np.all(costs[:, -1] > costs[:, -2])


def test_costs_follow_the_experts_when_they_are_permuted():
    beta = np.array([0.2, 1.3, 0.05, 0.6])
    order = np.array([2, 0, 3, 1])
    np.testing.assert_allclose(commitment_costs(beta[order], A_MIN),
                               commitment_costs(beta, A_MIN)[order], atol=1e-6)


def test_result_type():
    result = commitment_cost([0.3, 0.7], 0, 0.5, [0.05, 0.05])
    assert isinstance(result, CommitmentCost) and isinstance(result.kl, float)
    np.testing.assert_allclose(result.mean, [0.5, 0.5], atol=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    ({"beta": [1.0]}, "beta"),
    ({"beta": [[1.0, 1.0]]}, "beta"),
    ({"beta": [1.0, 0.0]}, "beta"),
    ({"beta": [1.0, np.nan]}, "beta"),
    ({"floor": [0.05, 0.05, 0.05]}, "floor"),
    ({"floor": -0.1}, "floor"),
    ({"floor": np.inf}, "floor"),
    ({"target": 2}, "target"),
    ({"target": -1}, "target"),
    ({"target": True}, "target"),
    ({"target": 0.0}, "target"),
    ({"level": 1.0}, "level"),
    ({"level": 0.0}, "level"),
    ({"level": "max"}, "level"),
    ({"level": None}, "level"),
])
def test_bad_inputs_raise(kwargs, match):
    arguments = {"beta": [1.0, 2.0], "target": 0, "level": 0.5, "floor": 0.05, **kwargs}
    with pytest.raises(ValueError, match=match):
        commitment_cost(**arguments)


def test_bad_levels_raise():
    for levels in ((), "argmax", (0.5, 2.0)):
        with pytest.raises(ValueError, match="level"):
            commitment_costs([1.0, 2.0], 0.05, levels)
