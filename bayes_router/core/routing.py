"""Routing metrics: what a routing costs and how committed it is (a leaf module).

They take the posterior-mean routing weights ``abar`` of shape ``(L, N, K)`` (layers, tokens,
experts) or ``(N, K)`` and, where compute matters, the cost vector ``costs (K,)`` in units of the
``full`` expert (``c_full = 1``), so that a cost of 100 % means all-full attention. They accept
NumPy arrays or torch tensors, return Python floats (or NumPy arrays) and never modify their
inputs. Names as in the results files (docs/phase1.md, "How to read the table").
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import entr

from bayes_router.core.arrays import check_simplex, float_array


def _routing_weights(abar) -> np.ndarray:
    """``abar`` as a float64 array ``(L, N, K)`` of probability vectors."""
    weights = float_array(abar, "abar", ndims=(2, 3))
    if weights.ndim == 2:
        weights = weights[None]  # (1, N, K)
    check_simplex(weights, "abar")
    return weights


def _cost_vector(costs, n_experts: int) -> np.ndarray:
    cost = float_array(costs, "costs", ndims=(1,))
    if cost.shape != (n_experts,):
        raise ValueError(f"costs must have shape ({n_experts},) to match abar, got {cost.shape}")
    if np.any(cost <= 0):
        raise ValueError(f"costs must be positive, got {cost.tolist()}")
    return cost


def projected_flop_cost(abar, costs) -> float:
    """Mean over layers and tokens of ``c[argmax_k abar[l, t, k]]``, in % of all-full attention:
    the cost of hard (argmax) routing.

    :param abar: posterior-mean routing weights ``(L, N, K)`` or ``(N, K)``.
    :param costs: cost of each expert relative to ``full`` ``(K,)``.
    """
    weights = _routing_weights(abar)
    cost = _cost_vector(costs, weights.shape[-1])
    return float(100.0 * cost[weights.argmax(-1)].mean())


def expected_flop_cost(abar, costs) -> float:
    """Mean over layers and tokens of ``sum_k abar[l, t, k] c[k]``, in % of all-full attention."""
    weights = _routing_weights(abar)
    cost = _cost_vector(costs, weights.shape[-1])
    return float(100.0 * (weights @ cost).mean())


def routing_entropy(abar) -> float:
    """Mean over layers and tokens of ``H(abar[l, t]) / log K``, in % (0: committed, 100: uniform).

    Needs ``K >= 2``; ``0 log 0 = 0``.
    """
    weights = _routing_weights(abar)
    n_experts = weights.shape[-1]
    if n_experts < 2:
        raise ValueError(f"abar must have K >= 2 experts for a normalised entropy, got {n_experts}")
    return float(100.0 * entr(weights).sum(-1).mean() / math.log(n_experts))


def expert_share(abar) -> np.ndarray:
    """Fraction of tokens whose argmax is each expert, per layer: an array ``(L, K)`` whose rows
    sum to 1 (``(1, K)`` for an ``(N, K)`` input). Ties go to the lower expert index."""
    weights = _routing_weights(abar)
    n_experts = weights.shape[-1]
    choice = weights.argmax(-1)  # (L, N)
    return (choice[..., None] == np.arange(n_experts)).mean(1)  # (L, K)
