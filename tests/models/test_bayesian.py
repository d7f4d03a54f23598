"""The Pyro model/guide pair: traces, the ELBO against a hand computation, one-pass == two-pass."""

import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import Dirichlet, kl_divergence

from bayes_router.inference.estimators import get_estimator
from bayes_router.inference.objective import loss_and_surrogate
from bayes_router.models.bayesian import BayesianRoutedLM, alpha_site
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.prior_free import PriorFreeRoutedLM
from bayes_router.models.priors import compute_aware_prior
from bayes_router.models.tinylm import FixedRouting

CFG = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_seq_len=16, window=3,
                   chunk_size=4, controller_hidden=8)
N = 40  # dataset size (sequences): the batch plate scales by N / B


# PyroModule parameters local to each module, no global parameter store
pytestmark = pytest.mark.usefixtures("local_params")


def _batch(B=3, T=9):
    return torch.randint(0, 11, (B, T)), torch.randint(0, 11, (B, T))


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


def test_compute_aware_prior():
    costs = torch.tensor([1.0, 0.15, 0.30])
    conc = compute_aware_prior(costs, 2.0, eta=1.0)
    pi = (1 / costs) / (1 / costs).sum()
    torch.testing.assert_close(conc, 2.0 * pi)
    torch.testing.assert_close(compute_aware_prior(costs, 3.0, eta=0.0), torch.full((3,), 1.0))
    assert compute_aware_prior(costs, [1.0, 2.0]).shape == (2, 3)
    for bad in (0.0, -1.0, [1.0, 0.0]):
        with pytest.raises(ValueError, match="beta0"):
            compute_aware_prior(costs, bad)
    with pytest.raises(ValueError, match="costs"):
        compute_aware_prior(torch.tensor([1.0, 0.0, 0.3]), 1.0)


def test_traces_have_the_expected_sites():
    model = BayesianRoutedLM(CFG, beta0=[0.5, 2.0])
    x, y = _batch()
    guide_trace = poutine.trace(model.guide).get_trace(x, y, dataset_size=N)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(
        x, y, dataset_size=N)
    for layer in range(2):
        for trace in (guide_trace, model_trace):
            site = trace.nodes[alpha_site(layer)]
            assert site["value"].shape == (3, 9, 3)
            assert site["fn"].batch_shape == (3,) and site["fn"].event_shape == (9, 3)
            assert [f.name for f in site["cond_indep_stack"]] == ["batch"]
            assert site["scale"] == pytest.approx(N / 3)
            assert isinstance(site["fn"].base_dist, Dirichlet)
        prior = model_trace.nodes[alpha_site(layer)]["fn"].base_dist.concentration[0, 0]
        assert prior.dtype == guide_trace.nodes[alpha_site(layer)]["value"].dtype == torch.float64
        torch.testing.assert_close(prior, compute_aware_prior(model.costs, [0.5, 2.0][layer])
                                   .double())
    obs = model_trace.nodes["obs"]
    assert obs["is_observed"] and torch.equal(obs["value"], y)
    assert obs["fn"].batch_shape == (3,) and obs["fn"].event_shape == (9,)


def _guide_sample_log_likelihood(model, x, y, seed):
    """The guide's samples under ``seed`` and ``sum log p(y | x, alpha)`` computed by hand."""
    torch.manual_seed(seed)
    out = model.guide(x, y, dataset_size=N)
    alphas = [r.decision.weights for r in out.routing]
    logits = model.lm(x, FixedRouting(alphas)).logits
    log_lik = -F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1), reduction="sum")
    return out, alphas, log_lik


def test_elbo_matches_a_hand_computed_elbo():
    """TraceMeanField loss = -(N/B) * [sum log p(y | alpha) - sum KL(q || prior)], same samples."""
    model = BayesianRoutedLM(CFG, beta0=0.7)
    _randomise(model.controllers)
    x, y = _batch()
    torch.manual_seed(1)
    loss, _ = loss_and_surrogate(TraceMeanField_ELBO(max_plate_nesting=1), model.model,
                                 model.guide, x, y, dataset_size=N)
    out, _, log_lik = _guide_sample_log_likelihood(model, x, y, seed=1)
    prior = model.prior_concentration()
    kl = sum(kl_divergence(Dirichlet(r.decision.concentration), Dirichlet(prior[layer])).sum()
             for layer, r in enumerate(out.routing))
    expected = -(N / 3) * (log_lik - kl)
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_monte_carlo_kl_elbo_matches_hand_computation():
    model = BayesianRoutedLM(CFG, beta0=0.7, estimator=get_estimator("reparam-mc"))
    x, y = _batch()
    torch.manual_seed(2)
    loss, _ = loss_and_surrogate(Trace_ELBO(max_plate_nesting=1), model.model, model.guide, x, y,
                                 dataset_size=N)
    out, alphas, log_lik = _guide_sample_log_likelihood(model, x, y, seed=2)
    prior = model.prior_concentration()
    log_ratio = sum(Dirichlet(prior[layer]).log_prob(a).sum()
                    - Dirichlet(r.decision.concentration).log_prob(a).sum()
                    for layer, (r, a) in enumerate(zip(out.routing, alphas)))
    expected = -(N / 3) * (log_lik + log_ratio)
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_prior_free_loss_is_cross_entropy():
    model = PriorFreeRoutedLM(CFG, tau=0.5)
    _randomise(model.controllers)
    x, y = _batch()
    loss, surrogate = loss_and_surrogate(Trace_ELBO(max_plate_nesting=1), model.model,
                                         model.guide, x, y, dataset_size=N)
    logits = model.predict(x).logits
    ce = F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1), reduction="sum") * N / 3
    assert float(loss) == pytest.approx(float(ce.detach()), rel=1e-5)
    assert float(surrogate.detach()) == pytest.approx(float(ce.detach()), rel=1e-5)


@pytest.mark.parametrize("estimator,particles", [("reparam-analytic", 1), ("reparam-mc", 3),
                                                 ("score", 1)])
def test_one_pass_equals_two_pass(estimator, particles):
    """The memoised pair gives the naive pair's loss and gradients, with one network pass."""
    from bayes_router.inference.estimators import get_estimator

    model = BayesianRoutedLM(CFG, beta0=0.7, estimator=get_estimator(estimator)).double()
    _randomise(model.controllers)
    x, y = _batch()
    elbo = get_estimator(estimator).make_elbo(num_particles=particles, max_plate_nesting=1)
    passes = []
    model.lm.register_forward_hook(lambda *_: passes.append(1))
    results = []
    for one_pass in (True, False):
        model.one_pass = one_pass
        passes.clear()
        torch.manual_seed(3)
        loss, surrogate = loss_and_surrogate(elbo, model.model, model.guide, x, y,
                                             dataset_size=N)
        grads = torch.autograd.grad(surrogate, list(model.parameters()), allow_unused=True)
        results.append((loss, grads, len(passes)))
    (loss1, grads1, passes1), (loss2, grads2, passes2) = results
    assert passes1 == 1 and passes2 == 2  # vectorised particles: one pass for all of them
    torch.testing.assert_close(loss1, loss2)
    for g1, g2 in zip(grads1, grads2):
        if g1 is None:
            assert g2 is None
        else:
            torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_learned_beta0_is_a_positive_model_parameter():
    model = BayesianRoutedLM(CFG, beta0="learn", beta0_init=2.0)
    names = dict(model.named_parameters())
    assert "beta0_unconstrained" in names
    torch.testing.assert_close(model.beta0, torch.full((2,), 2.0))
    x, y = _batch()
    _, surrogate = loss_and_surrogate(TraceMeanField_ELBO(max_plate_nesting=1), model.model,
                                      model.guide, x, y, dataset_size=N)
    surrogate.backward()
    assert names["beta0_unconstrained"].grad is not None
    assert names["beta0_unconstrained"].grad.abs().sum() > 0


def test_posterior_mean_and_model_average():
    model = BayesianRoutedLM(CFG, beta0=1.0)
    _randomise(model.controllers)
    x, _ = _batch()
    out = model.predict(x, mode="soft")
    r = out.routing[0]
    torch.testing.assert_close(r.decision.mean, r.decision.concentration
                               / r.decision.concentration.sum(-1, keepdim=True))
    probs = model.sample_predict(x, num_samples=4)
    assert probs.shape == (3, 9, 11)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 9))


@pytest.mark.parametrize("kwargs,match", [
    ({"beta0": 0.0}, "beta0"), ({"beta0": -1.0}, "beta0"), ({"beta0": "auto"}, "beta0"),
    ({"a_min": 0.0}, "a_min"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesianRoutedLM(CFG, **kwargs)


@pytest.mark.parametrize("estimator", ["reparam-mc", object()])
def test_estimator_must_be_injected_as_an_object(estimator):
    """The model looks nothing up by name: the code that builds it passes the estimator."""
    with pytest.raises(TypeError, match="estimator"):
        BayesianRoutedLM(CFG, estimator=estimator)


def test_default_family_samples_in_float64():
    model = BayesianRoutedLM(CFG)
    x, _ = _batch()
    trace = poutine.trace(model.guide).get_trace(x)
    assert trace.nodes[alpha_site(0)]["value"].dtype == torch.float64


def test_bad_batches():
    model = BayesianRoutedLM(CFG)
    x, y = _batch()
    with pytest.raises(ValueError, match="same shape"):
        model.guide(x, y[:, :5])
    with pytest.raises(ValueError, match="outside"):
        model.model(x, torch.full_like(y, 11))
    with pytest.raises(ValueError, match="dataset_size"):
        model.guide(x, y, dataset_size=2)


def test_memo_is_not_reused_for_other_inputs():
    """A model replayed on a guide trace of other inputs recomputes the network."""
    model = BayesianRoutedLM(CFG, beta0=0.7)
    _randomise(model.controllers)
    x1, _ = _batch()
    x2, _ = _batch()
    guide_trace = poutine.trace(model.guide).get_trace(x1)
    logits = poutine.replay(model.model, trace=guide_trace)(x2)
    alphas = [guide_trace.nodes[alpha_site(layer)]["value"].float() for layer in range(2)]
    torch.testing.assert_close(logits, model.lm(x2, FixedRouting(alphas)).logits)


def test_prior_keeps_the_model_dtype():
    model = BayesianRoutedLM(CFG, beta0=0.7).double()
    assert model.prior_concentration().dtype == torch.float64


def test_memo_is_not_reused_after_the_parameters_change():
    """load_state_dict between tracing the guide and replaying the model: the model must run
    the new network, not return the old one's logits."""
    model = BayesianRoutedLM(CFG, beta0=0.7)
    other = BayesianRoutedLM(CFG, beta0=0.7)
    _randomise(model)
    _randomise(other)
    x, _ = _batch()
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model.load_state_dict(other.state_dict())
    logits = poutine.replay(model.model, trace=guide_trace)(x)
    alphas = [guide_trace.nodes[alpha_site(layer)]["value"].float() for layer in range(2)]
    torch.testing.assert_close(logits, other.lm(x, FixedRouting(alphas)).logits)


def test_memo_is_not_reused_across_grad_modes():
    """A guide traced under no_grad and a model replayed with grad on: the likelihood must
    carry a graph (its gradient was silently zero when the memo was reused)."""
    model = BayesianRoutedLM(CFG, beta0=0.7)
    _randomise(model)
    x, y = _batch()
    with torch.no_grad():
        guide_trace = poutine.trace(model.guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x, y)
    log_likelihood = model_trace.nodes["obs"]["fn"].log_prob(y).sum()
    assert log_likelihood.requires_grad
    (grad,) = torch.autograd.grad(log_likelihood, model.lm.head.weight)
    assert grad.abs().sum() > 0


def test_clear_cache_drops_the_memo():
    model = BayesianRoutedLM(CFG, beta0=0.7)
    x, _ = _batch()
    model.guide(x)
    assert model._memo is not None
    model.clear_cache()
    assert model._memo is None


@pytest.mark.parametrize("estimator", ["reparam-mc", "reparam-analytic", "stl", "naive-gamma",
                                       "rsvi", "score", "iwae", "dreg"])
def test_float32_training_at_the_guide_floor_has_finite_gradients(estimator):
    """Concentrations at a_min = 0.05 (controllers saturated low): in float32 torch's Dirichlet
    backward gave NaN on every step and the clamped draws biased the estimates; the Dirichlet
    sites now run in float64."""
    torch.manual_seed(1)
    cfg = TinyLMConfig.from_dict({**CFG.to_dict(), "max_seq_len": 64})
    model = BayesianRoutedLM(cfg, beta0=1.0, estimator=get_estimator(estimator))
    for controller in model.controllers:
        torch.nn.init.constant_(controller.net[-1].bias, -30.0)  # softplus ~ 0: a ~ a_min
    x, y = _batch(B=8, T=64)
    concentration = model.guide(x).routing[0].decision.concentration
    assert concentration.dtype == torch.float32
    torch.testing.assert_close(concentration, torch.full_like(concentration, 0.05))
    particles = 2 if estimator in ("iwae", "dreg") else 1
    elbo = model.estimator.make_elbo(num_particles=particles, max_plate_nesting=1)
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-7)
    for _ in range(10):
        loss, surrogate = loss_and_surrogate(elbo, model.model, model.guide, x, y,
                                             dataset_size=N)
        optimiser.zero_grad()
        surrogate.backward()  # unscaled: float32 overflowed to inf, then NaN, in the backward
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        optimiser.step()
