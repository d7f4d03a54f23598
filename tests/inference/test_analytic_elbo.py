"""AnalyticKLELBO: Pyro's mean-field ELBO, the same loss and gradients, without the Dirichlet
log-densities the closed-form KL makes unnecessary."""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from bayes_router.inference.estimators import get_estimator
from bayes_router.inference.estimators._util import has_analytic_kl
from bayes_router.inference.estimators.reparam_analytic import AnalyticKLELBO
from bayes_router.inference.objective import loss_and_surrogate
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig

CFG = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_seq_len=16, window=3,
                   chunk_size=4, controller_hidden=8)

pytestmark = pytest.mark.usefixtures("local_params")


def _loss_and_grads(elbo, model, x, y, seed, **kwargs):
    torch.manual_seed(seed)
    loss, surrogate = loss_and_surrogate(elbo, model.model, model.guide, x, y, dataset_size=12,
                                         **kwargs)
    model.clear_cache()
    params = [p for p in model.parameters() if p.requires_grad]
    return float(loss), torch.autograd.grad(surrogate, params, allow_unused=True)


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("kl_scale", [1.0, 0.3])
@pytest.mark.parametrize("validation", [True, False])
def test_same_loss_and_gradients_as_pyros_mean_field_elbo(num_particles, kl_scale, validation):
    torch.manual_seed(0)
    model = BayesianRoutedLM(CFG, beta0=(0.7, 2.0))
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 11, (3, 9), generator=g) for _ in range(2))
    kwargs = dict(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    with pyro.validation_enabled(validation):
        ours = _loss_and_grads(AnalyticKLELBO(**kwargs), model, x, y, 4, kl_scale=kl_scale)
        ref = _loss_and_grads(TraceMeanField_ELBO(**kwargs), model, x, y, 4, kl_scale=kl_scale)
    assert ours[0] == ref[0]
    for a, b in zip(ours[1], ref[1], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def test_the_dirichlet_log_densities_are_not_computed(monkeypatch):
    calls = {"n": 0}
    real = torch.distributions.Dirichlet.log_prob

    def counted(self, value):
        calls["n"] += 1
        return real(self, value)

    monkeypatch.setattr(torch.distributions.Dirichlet, "log_prob", counted)
    model = BayesianRoutedLM(CFG)
    x = torch.randint(0, 11, (2, 9))
    loss_and_surrogate(TraceMeanField_ELBO(max_plate_nesting=1), model.model, model.guide, x, x)
    assert calls["n"] == 2 * CFG.n_layers  # Pyro's: prior and guide of every layer
    calls["n"] = 0
    loss_and_surrogate(get_estimator("reparam-analytic").make_elbo(max_plate_nesting=1),
                       model.model, model.guide, x, x)
    assert calls["n"] == 0
    calls["n"] = 0  # an estimator without the closed form still computes them
    loss_and_surrogate(Trace_ELBO(max_plate_nesting=1), model.model, model.guide, x, x)
    assert calls["n"] == 2 * CFG.n_layers


def test_has_analytic_kl_follows_torchs_registry():
    d = pyro.distributions
    dirichlet = d.Dirichlet(torch.ones(4, 3))
    assert has_analytic_kl(dirichlet.to_event(1), d.Dirichlet(torch.full((4, 3), 2.0)).to_event(1))
    assert not has_analytic_kl(dirichlet.to_event(1), d.Delta(torch.ones(4, 3)).to_event(1))
    # a .to_event on one side only: torch's registry has nothing for it, Pyro's KL raises,
    # and the ELBO must still find the log-densities of its Monte-Carlo fallback
    one_sided = (dirichlet.to_event(1), d.Dirichlet(torch.full((4, 3), 2.0)))
    assert not has_analytic_kl(*one_sided)
    with pytest.raises(NotImplementedError):
        torch.distributions.kl_divergence(*one_sided)
