"""Routing metrics against hand-worked values and a plain-loop reference."""

import math

import numpy as np
import pytest
import torch

from bayes_router.core.routing import (
    expected_flop_cost,
    expert_share,
    projected_flop_cost,
    routing_entropy,
)

SEED_COSTS = [1.0, 0.15, 0.30]


def naive_routing_metrics(abar, costs):
    """Loops over layers and tokens: (projected %, expected %, entropy %, share (L, K))."""
    abar = np.asarray(abar, dtype=float)
    if abar.ndim == 2:
        abar = abar[None]
    n_layers, n_tokens, n_experts = abar.shape
    projected = expected = entropy = 0.0
    share = np.zeros((n_layers, n_experts))
    for layer in range(n_layers):
        for token in range(n_tokens):
            weights = list(abar[layer, token])
            best = max(range(n_experts), key=lambda k: (weights[k], -k))  # first maximum
            projected += costs[best]
            expected += sum(w * c for w, c in zip(weights, costs, strict=True))
            entropy += -sum(w * math.log(w) for w in weights if w > 0) / math.log(n_experts)
            share[layer, best] += 1
    total = n_layers * n_tokens
    return 100 * projected / total, 100 * expected / total, 100 * entropy / total, share / n_tokens


def test_hand_worked_example():
    abar = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.5, 0.25, 0.25]]
    # argmax experts: full, linear, local, full -> (1 + 0.15 + 0.3 + 1) / 4
    assert projected_flop_cost(abar, SEED_COSTS) == pytest.approx(61.25)
    expected = (0.76 + 0.28 + 0.395 + 0.6125) / 4 * 100
    assert expected_flop_cost(abar, SEED_COSTS) == pytest.approx(expected)
    np.testing.assert_allclose(expert_share(abar), [[0.5, 0.25, 0.25]])


def test_entropy_extremes():
    assert routing_entropy(np.full((5, 4), 0.25)) == pytest.approx(100.0)
    assert routing_entropy(np.eye(3)) == pytest.approx(0.0)
    # one uniform and one committed token: half of the maximum
    assert routing_entropy([[0.5, 0.5], [1.0, 0.0]]) == pytest.approx(50.0)


def test_all_full_routing_costs_one_hundred_percent():
    abar = np.tile([0.9, 0.05, 0.05], (2, 7, 1))
    assert projected_flop_cost(abar, SEED_COSTS) == pytest.approx(100.0)


@pytest.mark.parametrize("shape", [(3, 40, 3), (25, 4), (2, 9, 5)])
def test_against_loop_reference(shape):
    rng = np.random.default_rng(1)
    abar = rng.dirichlet(np.full(shape[-1], 0.7), size=shape[:-1])
    costs = rng.uniform(0.1, 1.0, shape[-1])
    projected, expected, entropy, share = naive_routing_metrics(abar, costs)
    assert projected_flop_cost(abar, costs) == pytest.approx(projected)
    assert expected_flop_cost(abar, costs) == pytest.approx(expected)
    assert routing_entropy(abar) == pytest.approx(entropy)
    np.testing.assert_allclose(expert_share(abar), share)
    np.testing.assert_allclose(expert_share(abar).sum(-1), 1.0)


def test_torch_and_numpy_agree():
    abar = torch.distributions.Dirichlet(torch.ones(3)).sample((2, 30))
    costs = torch.tensor(SEED_COSTS)
    assert projected_flop_cost(abar, costs) == pytest.approx(
        projected_flop_cost(abar.numpy(), SEED_COSTS))
    assert expected_flop_cost(abar, costs) == pytest.approx(
        expected_flop_cost(abar.double().numpy(), SEED_COSTS), rel=1e-6)
    assert routing_entropy(abar) == pytest.approx(routing_entropy(abar.double().numpy()), rel=1e-6)
    np.testing.assert_allclose(expert_share(abar), expert_share(abar.numpy()))


@pytest.mark.parametrize(
    "abar, costs, match",
    [
        ([[0.5, 0.5, 0.0]], [1.0, 0.5], "costs"),
        ([[0.5, 0.5]], [1.0, 0.0], "costs"),
        ([[0.5, 0.6]], [1.0, 0.5], "abar"),
        ([[1.2, -0.2]], [1.0, 0.5], "abar"),
        ([0.5, 0.5], [1.0, 0.5], "abar"),
        (np.zeros((0, 2)), [1.0, 0.5], "abar"),
        ([[np.nan, 0.5]], [1.0, 0.5], "abar"),
    ],
)
def test_invalid_input_raises(abar, costs, match):
    with pytest.raises(ValueError, match=match):
        projected_flop_cost(abar, costs)
    with pytest.raises(ValueError, match=match):
        expected_flop_cost(abar, costs)


def test_entropy_needs_two_experts():
    with pytest.raises(ValueError, match="K >= 2"):
        routing_entropy([[1.0], [1.0]])
