"""The KL price of committing a Dirichlet routing guide to one expert (a leaf module).

Per token and layer the guide ``q = Dir(a)`` pays ``KL(Dir(a) || Dir(beta))`` to the prior
``p = Dir(beta)`` in the ELBO. With ``a0 = sum_k a_k``, ``beta0 = sum_k beta_k`` and
``log B(a) = sum_k lgamma(a_k) - lgamma(a0)``,

.. math::

    KL(Dir(a) || Dir(beta)) = log B(beta) - log B(a)
        + sum_k (a_k - beta_k) (psi(a_k) - psi(a0)),

with gradient ``dKL / da_j = (a_j - beta_j) psi'(a_j) - (a0 - beta0) psi'(a0)``. The guide is
admissible when ``a >= floor`` elementwise (``floor = a_min`` for the default guide, ``floor =
beta`` for the ``seed`` parameterisation ``a = beta + softplus(.)``).

:func:`commitment_cost` is the smallest KL an admissible guide must pay for its mean ``a / a0``
to commit to expert ``k`` at a level: ``"argmax"`` (``a_k >= a_j`` for all ``j``, ties allowed)
or a weight ``p`` in ``(0, 1)`` (``a_k / a0 >= p``). It is a lower bound on what that commitment
costs the ELBO per token per layer: the likelihood gain of routing the token to ``k`` must exceed
it. :func:`floor_kl` is the same minimum without the commitment (0 when ``beta >= floor``).

The feasible set is a polyhedron in ``a`` but the KL is not convex in ``a``, so the minimum is
found by SLSQP in ``u = log a`` (bounds ``u >= log floor``, analytic gradients) from three
starts: the floor minimiser, the floor and their geometric mean, each with ``a_k`` raised just
enough to commit. Every candidate is made exactly feasible that way before they are compared, so
the reported guide always commits and respects the floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import polygamma, softmax

from bayes_router.core.arrays import float_array
from bayes_router.core.dirichlet import dirichlet_kl

#: The commitment level "expert k is (weakly) the argmax of the guide's mean".
ARGMAX = "argmax"
#: The levels :func:`commitment_costs` reports by default.
DEFAULT_LEVELS = (ARGMAX, 0.5, 0.9)

Level = str | float

#: The optimiser's line searches stay below ``a = _CEILING * max(sum(floor), 1)`` (no overflow).
_CEILING = 1e12


@dataclass(frozen=True)
class CommitmentCost:
    """The cheapest admissible guide that commits to the target expert.

    :ivar kl: ``KL(Dir(a) || Dir(beta))`` of that guide, in nats.
    :ivar concentration: its concentration ``a`` ``(K,)``.
    :ivar mean: its mean ``a / a0`` ``(K,)``.
    :ivar feasible_at_prior: the guide that minimises the KL subject only to the floor already
        commits, so ``kl`` equals :func:`floor_kl`.
    """

    kl: float
    concentration: np.ndarray
    mean: np.ndarray
    feasible_at_prior: bool


def _kl(a: np.ndarray, beta: np.ndarray) -> float:
    return float(dirichlet_kl(torch.from_numpy(a), torch.from_numpy(beta)))


def _kl_gradient(a: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``dKL(Dir(a) || Dir(beta)) / da`` ``(K,)``."""
    return (a - beta) * polygamma(1, a) - (a.sum() - beta.sum()) * polygamma(1, a.sum())


def _objective(beta: np.ndarray, floor: np.ndarray):
    """KL and its gradient as functions of ``u = log a`` (``a`` clipped to the floor)."""

    def objective(u: np.ndarray) -> tuple[float, np.ndarray]:
        a = np.maximum(np.exp(u), floor)
        return _kl(a, beta), _kl_gradient(a, beta) * a

    return objective


def _commits(a: np.ndarray, target: int, level: Level) -> bool:
    if level == ARGMAX:
        return bool(a[target] >= a.max())
    return bool(a[target] >= level * a.sum())


def _committed(a: np.ndarray, target: int, level: Level) -> np.ndarray:
    """``a`` with ``a_target`` raised just enough to commit (unchanged if it already does)."""
    a = a.copy()
    if level == ARGMAX:
        a[target] = a.max()
        return a
    rest = a.sum() - a[target]
    a[target] = max(a[target], level / (1.0 - level) * rest)
    while not _commits(a, target, level):  # rounding: a step or two of one ulp
        a[target] = np.nextafter(a[target], np.inf)
    return a


def _constraint(n_experts: int, target: int, level: Level) -> dict:
    """The commitment as an SLSQP inequality ``g(u) >= 0`` in ``u = log a``."""
    if level == ARGMAX:
        others = [j for j in range(n_experts) if j != target]
        jacobian = -np.eye(n_experts)[others]  # (K - 1, K)
        jacobian[:, target] = 1.0
        return {"type": "ineq", "fun": lambda u: u[target] - u[others],
                "jac": lambda u: jacobian}
    log_level, unit = math.log(level), np.eye(n_experts)[target]
    return {"type": "ineq",
            "fun": lambda u: np.array([u[target] - np.logaddexp.reduce(u) - log_level]),
            "jac": lambda u: (unit - softmax(u))[None]}


def _minimise(objective, starts: list[np.ndarray], floor: np.ndarray,
              constraints: list[dict]) -> list[np.ndarray]:
    """The local minimiser ``a`` (clipped to the floor) reached from each start."""
    ceiling = math.log(_CEILING * max(floor.sum(), 1.0))
    bounds = [(math.log(f), max(ceiling, math.log(f) + 1.0)) for f in floor]
    method = "SLSQP" if constraints else "L-BFGS-B"
    options = {"maxiter": 200, "ftol": 1e-12} if constraints else {"maxiter": 200}
    found = []
    for start in starts:
        result = minimize(objective, np.log(start), jac=True, method=method, bounds=bounds,
                          constraints=constraints, options=options)
        found.append(np.maximum(np.exp(result.x), floor))
    return found


def _floor_minimiser(beta: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """The admissible ``a`` (``a >= floor``) of smallest KL to ``Dir(beta)``."""
    clipped = np.maximum(beta, floor)
    if np.array_equal(clipped, beta):
        return beta.copy()
    starts = [clipped, np.sqrt(clipped * floor)]
    found = _minimise(_objective(beta, floor), starts, floor, constraints=[])
    return min([clipped, *found], key=lambda a: _kl(a, beta))


def _vectors(beta, floor) -> tuple[np.ndarray, np.ndarray]:
    beta = float_array(beta, "beta", ndims=(1,))
    if len(beta) < 2:
        raise ValueError(f"beta must hold K >= 2 concentrations, got {len(beta)}")
    if np.any(beta <= 0):
        raise ValueError(f"beta must be positive, got minimum {beta.min():g}")
    floor = float_array(floor, "floor", ndims=(0, 1))
    if floor.ndim == 0:
        floor = np.full_like(beta, float(floor))
    if floor.shape != beta.shape:
        raise ValueError(f"floor must be a scalar or have shape {beta.shape} like beta, got "
                         f"{floor.shape}")
    if np.any(floor <= 0):
        raise ValueError(f"floor must be positive, got minimum {floor.min():g}")
    return beta, floor


def _check_target(target, n_experts: int) -> int:
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not (
            0 <= target < n_experts):
        raise ValueError(f"target must be an expert index in [0, {n_experts}), got {target!r}")
    return int(target)


def _check_level(level) -> Level:
    if isinstance(level, str) and level == ARGMAX:
        return ARGMAX
    if (isinstance(level, (float, int, np.floating, np.integer)) and not isinstance(level, bool)
            and 0.0 < level < 1.0):
        return float(level)
    raise ValueError(f"level must be {ARGMAX!r} or a mean weight in (0, 1), got {level!r}")


def floor_kl(beta, floor) -> float:
    """The smallest ``KL(Dir(a) || Dir(beta))`` over admissible guides ``a >= floor``.

    It is 0 when ``beta >= floor``; otherwise every guide pays at least this, whatever it routes.

    :param beta: prior concentration ``(K,)``, positive.
    :param floor: lower bound on the guide's concentration, ``(K,)`` or a scalar, positive.
    """
    beta, floor = _vectors(beta, floor)
    return _kl(_floor_minimiser(beta, floor), beta)


def _commitment_cost(beta: np.ndarray, floor: np.ndarray, free: np.ndarray, target: int,
                     level: Level) -> CommitmentCost:
    """:func:`commitment_cost` for validated inputs, given the floor minimiser ``free``."""
    if _commits(free, target, level):
        best, feasible_at_prior = free, True
    else:
        starts = [_committed(a, target, level) for a in (free, floor, np.sqrt(free * floor))]
        constraints = [_constraint(len(beta), target, level)]
        found = _minimise(_objective(beta, floor), starts, floor, constraints)
        candidates = starts + [_committed(a, target, level) for a in found]
        best, feasible_at_prior = min(candidates, key=lambda a: _kl(a, beta)), False
    return CommitmentCost(kl=_kl(best, beta), concentration=best, mean=best / best.sum(),
                          feasible_at_prior=feasible_at_prior)


def commitment_cost(beta, target: int, level: Level, floor) -> CommitmentCost:
    """The cheapest admissible guide ``Dir(a)`` (``a >= floor``) whose mean commits to
    ``target``, and its ``KL(Dir(a) || Dir(beta))``: the KL per token per layer a guide must pay
    for that commitment, a lower bound on its price in the ELBO.

    :param beta: prior concentration ``(K,)``, positive.
    :param target: the expert ``k`` to commit to, in ``[0, K)``.
    :param level: ``"argmax"`` (``a_k >= a_j`` for all ``j``) or a weight ``p`` in ``(0, 1)``
        (``a_k / sum(a) >= p``).
    :param floor: lower bound on the guide's concentration, ``(K,)`` or a scalar, positive
        (``a_min`` for the default guide, ``beta`` for the ``seed`` parameterisation).
    """
    beta, floor = _vectors(beta, floor)
    target, level = _check_target(target, len(beta)), _check_level(level)
    return _commitment_cost(beta, floor, _floor_minimiser(beta, floor), target, level)


def commitment_costs(beta, floor, levels=DEFAULT_LEVELS) -> np.ndarray:
    """:func:`commitment_cost` (the KL) of every expert at every level, ``(K, len(levels))``.

    :param beta: prior concentration ``(K,)``, positive.
    :param floor: lower bound on the guide's concentration, ``(K,)`` or a scalar, positive.
    :param levels: commitment levels, each ``"argmax"`` or a weight in ``(0, 1)``.
    """
    beta, floor = _vectors(beta, floor)
    if isinstance(levels, str) or len(levels) == 0:
        raise ValueError(f"levels must be a non-empty sequence of levels, got {levels!r}")
    levels = [_check_level(level) for level in levels]
    free = _floor_minimiser(beta, floor)
    return np.array([[_commitment_cost(beta, floor, free, k, level).kl for level in levels]
                     for k in range(len(beta))])
