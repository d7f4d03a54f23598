"""The model's routing prior dispatches its KL to the fused Dirichlet KL: for every estimator's
guide family, with no ambiguity, and with the values and gradients of torch's own rule on the
traced model (learned beta0, so the prior's gradient is checked too)."""

import warnings

import pytest
import torch
from torch.distributions import kl_divergence
from torch.distributions.kl import _kl_dirichlet_dirichlet

from bayes_router.inference.estimators import estimator_names, get_estimator
from bayes_router.inference.estimators._util import importance_traces
from bayes_router.models.bayesian import BayesianRoutedLM, alpha_site
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.priors import RoutingPrior

CFG = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_seq_len=16, window=3,
                   chunk_size=4, controller_hidden=8)

pytestmark = pytest.mark.usefixtures("local_params")


@pytest.mark.parametrize("name", estimator_names())
def test_every_guide_family_takes_the_fused_rule_unambiguously(name, monkeypatch):
    concentration = torch.rand(2, 5, 3, dtype=torch.float64) * 3 + 0.05
    guide = get_estimator(name).dirichlet(concentration.requires_grad_())
    prior = RoutingPrior(torch.tensor([0.4, 1.1, 2.0], dtype=torch.float64).expand(5, 3))
    monkeypatch.setattr(torch.distributions.kl, "_KL_MEMOIZE", {})  # dispatch afresh
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns where two KL rules tie (first lookup only)
        kl = kl_divergence(guide, prior.expand((2, 5)))
    assert type(kl.grad_fn).__name__ == "_DirichletKLBackward"
    torch.testing.assert_close(kl, _kl_dirichlet_dirichlet(guide, prior.expand((2, 5))))


def test_the_traced_sites_kl_matches_torch_in_value_and_gradient():
    torch.manual_seed(0)
    model = BayesianRoutedLM(CFG, beta0="learn", estimator=get_estimator("reparam-analytic"))
    x, y = torch.randint(0, 11, (3, 16)), torch.randint(0, 11, (3, 16))
    model_trace, guide_trace, _ = importance_traces(model.model, model.guide, (x, y),
                                                    {"dataset_size": 100}, 1, analytic_kl=True)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    ours, reference = 0.0, 0.0
    for layer in range(CFG.n_layers):
        prior, guide = (t.nodes[alpha_site(layer)]["fn"] for t in (model_trace, guide_trace))
        assert isinstance(prior.base_dist, RoutingPrior)  # after the plate's expand, too
        ours = ours + kl_divergence(guide, prior).sum()
        reference = reference + _kl_dirichlet_dirichlet(guide.base_dist, prior.base_dist).sum()
    grads = torch.autograd.grad(ours, params, retain_graph=True, allow_unused=True)
    ref_grads = torch.autograd.grad(reference, params, allow_unused=True)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    checked = 0
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
            checked += 1
    assert checked > 2  # the controllers and beta0 at least
    beta0_grad = grads[names.index("beta0_unconstrained")]
    assert beta0_grad is not None and bool((beta0_grad != 0).all())  # the prior's own path
