"""The categorical KL of core/categorical.py against the direct formula and torch's
distributions, at extreme logits, with gradients and on bad input."""

import math

import numpy as np
import pytest
import torch

from bayes_router.core.categorical import kl_divergence_categorical


def test_kl_matches_direct_formula_and_torch_distributions():
    rng = np.random.default_rng(4)
    p_logits, q_logits = rng.normal(size=(2, 30, 7)) * 3
    p = np.exp(p_logits) / np.exp(p_logits).sum(-1, keepdims=True)
    q = np.exp(q_logits) / np.exp(q_logits).sum(-1, keepdims=True)
    direct = (p * np.log(p / q)).sum(-1)
    np.testing.assert_allclose(kl_divergence_categorical(p_logits, q_logits), direct, rtol=1e-10)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=torch.from_numpy(p_logits)),
        torch.distributions.Categorical(logits=torch.from_numpy(q_logits)))
    np.testing.assert_allclose(kl_divergence_categorical(p_logits, q_logits), reference.numpy(),
                               rtol=1e-10)


def test_kl_is_stable_and_differentiable():
    p = torch.tensor([[1000.0, 0.0, -1000.0], [2.0, 1.0, float("-inf")]], requires_grad=True)
    q = torch.tensor([[1000.0, 1000.0, -1000.0], [2.0, 1.0, 0.0]])
    kl = kl_divergence_categorical(p, q)
    assert isinstance(kl, torch.Tensor) and kl.shape == (2,)
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    # shifting every logit of a row changes nothing
    torch.testing.assert_close(kl, kl_divergence_categorical(p - 1000, q + 5))
    # row 0: p is one-hot on class 0 (to float32 precision) and q puts 1/2 there
    assert kl[0].item() == pytest.approx(math.log(2), rel=1e-6)
    # row 1: p has no mass on class 2, so KL = sum_{c<2} p_c log(p_c / q_c)
    p1 = torch.softmax(torch.tensor([2.0, 1.0], dtype=torch.float64), 0)
    q1 = torch.softmax(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64), 0)[:2]
    assert kl[1].item() == pytest.approx((p1 * (p1 / q1).log()).sum().item(), rel=1e-5)
    kl.sum().backward()
    assert torch.isfinite(p.grad).all()
    assert kl_divergence_categorical(q, q).abs().max() == 0


def test_kl_invalid_input_raises():
    with pytest.raises(ValueError, match="share a shape"):
        kl_divergence_categorical(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="p_logits"):
        kl_divergence_categorical(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="NaN"):
        kl_divergence_categorical([[0.0, np.nan]], [[0.0, 0.0]])
