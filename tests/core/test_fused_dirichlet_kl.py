"""The fused Dirichlet KL against its reference twin, torch's rule and finite differences, on
the routing shapes (a prior broadcast over particles, batch and tokens) and the hard cases:
concentrations at the guide floor and far above it, float32 inputs, degenerate shapes."""

import pytest
import torch
from torch.distributions import Dirichlet
from torch.distributions.kl import _kl_dirichlet_dirichlet

from bayes_router.core.dirichlet import dirichlet_kl, fused_dirichlet_kl


def _guide(shape, low=0.01, high=50.0, seed=0, dtype=torch.float64):
    """Concentrations log-uniform in [low, high]: the floor and sharp posteriors alike."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    return (low * (high / low) ** u).to(dtype).requires_grad_()


@pytest.mark.parametrize("prior_shape", [(3,), (5, 3), (2, 4, 5, 3)])
def test_values_and_gradients_match_the_reference_and_torch(prior_shape):
    a = _guide((2, 4, 5, 3))
    prior = _guide(prior_shape, low=0.05, high=5.0, seed=1)
    b = prior.expand(2, 4, 5, 3) if prior_shape != (2, 4, 5, 3) else prior
    weights = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(2),
                          dtype=torch.float64)  # an uneven cotangent
    results = []
    for kl in (fused_dirichlet_kl, dirichlet_kl,
               lambda q, p: _kl_dirichlet_dirichlet(Dirichlet(q), Dirichlet(p))):
        value = kl(a, b)
        results.append((value, *torch.autograd.grad((value * weights).sum(), (a, prior))))
    fused, reference, torch_rule = results
    for ours, ref in ((fused, reference), (fused, torch_rule)):
        for x, y in zip(ours, ref):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prior", ["scalar", "one value expanded", "full row expanded"])
def test_a_prior_whose_expert_axis_is_broadcast(prior):
    """A symmetric prior given as one value broadcast over the experts (stride 0 on the last
    axis too) keeps all K terms of its sums."""
    a = _guide((4, 5, 3))
    value = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = {"scalar": value, "one value expanded": value.expand(3),
         "full row expanded": value.expand(3).expand(4, 5, 3)}[prior]
    ours = fused_dirichlet_kl(a, b)
    ref = dirichlet_kl(a, value.expand(4, 5, 3).contiguous())
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert bool((ours >= 0).all())
    for g, r in zip(torch.autograd.grad(ours.sum(), (a, value)),
                    torch.autograd.grad(ref.sum(), (a, value)), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_the_gradients_match_finite_differences():
    a = _guide((3, 4, 3), low=0.02, high=20.0).detach().requires_grad_()
    prior = _guide((3,), low=0.1, high=3.0, seed=3).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda q, p: fused_dirichlet_kl(q, p.expand(3, 4, 3)),
                                    (a, prior))


def test_float32_inputs_agree_with_the_float64_reference():
    a = _guide((4, 6, 3), dtype=torch.float32)
    b = torch.tensor([0.3, 0.9, 1.8])
    ours = fused_dirichlet_kl(a, b.expand(4, 6, 3))
    grad, = torch.autograd.grad(ours.sum(), a)
    a64 = a.detach().double().requires_grad_()
    ref = dirichlet_kl(a64, b.double())
    ref_grad, = torch.autograd.grad(ref.sum(), a64)
    assert ours.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-3)


def test_degenerate_shapes():
    # two experts; the guide smaller than the prior (broadcast the other way); no rows at all
    a, b = _guide((2,)), _guide((3, 2), seed=4)
    torch.testing.assert_close(fused_dirichlet_kl(a, b), dirichlet_kl(a, b))
    assert fused_dirichlet_kl(a, b).shape == (3,)
    empty = fused_dirichlet_kl(torch.ones(0, 3, dtype=torch.float64), torch.ones(3))
    assert empty.shape == (0,)
    same = _guide((4, 3))
    torch.testing.assert_close(fused_dirichlet_kl(same, same.detach()),
                               torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_a_backward_that_builds_a_graph_raises_instead_of_being_wrong():
    a = _guide((2, 3))
    other = (a ** 2).sum()  # a term whose second derivative autograd does know
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(fused_dirichlet_kl(a, torch.ones(3)).sum() + other, a,
                            create_graph=True)
    grad, = torch.autograd.grad(fused_dirichlet_kl(a, torch.ones(3)).sum(), a)  # once: fine
    assert torch.isfinite(grad).all()
