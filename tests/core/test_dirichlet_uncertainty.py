"""Dirichlet uncertainty decomposition against closed forms and Monte Carlo."""

import math

import numpy as np
import pytest
import torch

from bayes_router.core.dirichlet import (
    RoutingUncertainty,
    aleatoric_uncertainty,
    epistemic_uncertainty,
    routing_uncertainty,
    total_concentration,
    total_uncertainty,
)


def test_uniform_beta_closed_form():
    # Dir(1, 1) = Beta(1, 1): E[H] = 2 * int_0^1 -x log x dx = 1/2, H(m) = log 2
    u = routing_uncertainty(np.array([1.0, 1.0]))
    assert u.total == pytest.approx(math.log(2))
    assert u.aleatoric == pytest.approx(0.5)
    assert u.epistemic == pytest.approx(math.log(2) - 0.5)
    assert u.concentration == pytest.approx(2.0)


@pytest.mark.parametrize(
    "concentration",
    [[0.1, 0.1], [0.3, 0.5, 0.2], [1.0, 1.0, 1.0], [5.0, 2.0, 0.7], [200.0, 50.0, 100.0],
     [0.8, 3.0, 12.0, 0.4]],
)
def test_against_monte_carlo(concentration):
    a = torch.tensor(concentration, dtype=torch.float64)
    samples = torch.distributions.Dirichlet(a).sample((200_000,))  # (S, K)
    entropies = -torch.special.xlogy(samples, samples).sum(-1)  # (S,)
    assert torch.isfinite(entropies).all()
    mc_mean = entropies.mean().item()
    standard_error = entropies.std().item() / math.sqrt(len(entropies))
    tolerance = 4 * standard_error + 1e-12

    u = routing_uncertainty(a)
    mean = a / a.sum()
    exact_total = -(mean * mean.log()).sum().item()
    assert u.total.item() == pytest.approx(exact_total)
    assert abs(u.aleatoric.item() - mc_mean) < tolerance
    assert abs(u.epistemic.item() - (exact_total - mc_mean)) < tolerance
    # the entropy of the sample mean estimates the total
    sample_mean = samples.mean(0)
    assert -(sample_mean * sample_mean.log()).sum().item() == pytest.approx(exact_total, abs=1e-2)


def test_epistemic_nonnegative_and_equal_to_the_difference():
    rng = np.random.default_rng(0)
    a = np.exp(rng.uniform(math.log(1e-3), math.log(1e6), size=(500, 4)))
    u = routing_uncertainty(a)
    assert np.all(u.epistemic >= 0)
    np.testing.assert_allclose(u.epistemic, u.total - u.aleatoric, atol=1e-9)
    assert np.all(u.aleatoric >= 0) and np.all(u.aleatoric <= u.total + 1e-12)


def test_sharp_posterior_mutual_information_asymptote():
    # digamma(x + 1) - log x = 1 / (2x) + O(x^-2), so MI -> (K - 1) / (2 a0) for large a0
    a = np.array([3e5, 3e5, 4e5])
    assert epistemic_uncertainty(a) == pytest.approx(2 / (2 * 1e6), rel=1e-3)


def test_single_functions_match_the_dataclass_and_keep_shape():
    a = torch.rand(2, 5, 3, dtype=torch.float64) * 4 + 0.05
    u = routing_uncertainty(a)
    assert isinstance(u, RoutingUncertainty)
    assert u.total.shape == (2, 5)
    torch.testing.assert_close(total_uncertainty(a), u.total)
    torch.testing.assert_close(aleatoric_uncertainty(a), u.aleatoric)
    torch.testing.assert_close(epistemic_uncertainty(a), u.epistemic)
    torch.testing.assert_close(total_concentration(a), a.sum(-1))


def test_tensor_in_tensor_out_with_gradients():
    a = torch.tensor([[0.5, 2.0, 1.0]], dtype=torch.float32, requires_grad=True)
    u = routing_uncertainty(a)
    assert isinstance(u.epistemic, torch.Tensor) and u.epistemic.dtype == torch.float32
    (u.total + u.aleatoric + u.epistemic).sum().backward()
    assert torch.isfinite(a.grad).all()
    numpy_result = routing_uncertainty(a.detach().numpy())
    assert isinstance(numpy_result.total, np.ndarray)
    np.testing.assert_allclose(numpy_result.aleatoric, u.aleatoric.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "concentration, match",
    [
        ([1.0, 0.0], "> 0"),
        ([1.0, -2.0], "> 0"),
        ([1.0, float("nan")], "NaN"),
        (np.zeros((0, 3)), "empty"),
        (2.0, "axis"),
        (torch.tensor([1.0, -1.0]), "> 0"),
        (torch.tensor(2.0), "axis"),
    ],
)
def test_invalid_concentration_raises(concentration, match):
    with pytest.raises(ValueError, match=match):
        routing_uncertainty(concentration)
