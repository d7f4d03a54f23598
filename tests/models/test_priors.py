"""The Bayesian router's priors: the prototype's ``seed`` prior and guide, a learned prior mean,
and the guide floor against the prior."""

import logging
import math

import pytest
import torch

from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.priors import SEED_EPSILON, compute_aware_prior, seed_prior

CFG = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_seq_len=16, window=3,
                   chunk_size=4, controller_hidden=8, cost_preset="seed")


# PyroModule parameters local to each module, no global parameter store
pytestmark = pytest.mark.usefixtures("local_params")


def test_seed_prior_reproduces_the_prototype_concentrations():
    beta = seed_prior(torch.tensor([1.0, 0.15, 0.30]), 1.0)
    torch.testing.assert_close(beta, torch.tensor([0.01, 0.86, 0.71]))
    mean = beta / beta.sum()
    torch.testing.assert_close(mean, torch.tensor([0.006, 0.544, 0.449]), atol=5e-4, rtol=0)
    assert SEED_EPSILON == 0.01
    with pytest.raises(ValueError, match="costs in"):
        seed_prior(torch.tensor([1.0, 1.5, 0.3]), 1.0)
    with pytest.raises(ValueError, match="beta0"):
        seed_prior(torch.tensor([1.0, 0.15, 0.3]), 0.0)


def test_seed_guide_never_puts_less_than_the_prior_on_any_expert():
    model = BayesianRoutedLM(CFG, beta0=[1.0, 3.0], prior="seed")
    with torch.no_grad():
        for controller in model.controllers:
            controller.net[-1].bias.fill_(-40.0)  # softplus ~ 0
    prior = model.prior_concentration()
    torch.testing.assert_close(prior, seed_prior(model.costs, torch.tensor([1.0, 3.0])))
    out = model.predict(torch.randint(0, 11, (2, 9)))
    for layer, r in enumerate(out.routing):
        a = r.decision.concentration
        assert bool((a >= prior[layer]).all())
        torch.testing.assert_close(a, prior[layer].expand_as(a), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.guide_floor(), prior)


def test_learned_prior_mean_is_a_simplex_parameter_initialised_at_the_cost_prior():
    learned = BayesianRoutedLM(CFG, beta0="learn", beta0_init=2.0, prior_mean="learn")
    fixed = BayesianRoutedLM(CFG, beta0=2.0)
    torch.testing.assert_close(learned.prior_concentration(), fixed.prior_concentration())
    names = dict(learned.named_parameters())
    assert "prior_mean_param_unconstrained" in names and "beta0_unconstrained" in names
    # a gradient step moves the mean, and it stays on the simplex
    loss = -torch.log(learned.prior_concentration()[:, 0]).sum()
    loss.backward()
    with torch.no_grad():
        for p in learned.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad)
    mean = learned.prior_mean_param
    torch.testing.assert_close(mean.sum(-1), torch.ones(2))
    assert bool((mean[:, 0] > fixed.prior_concentration()[:, 0] / 2).all())
    copy = learned.with_learned_beta0()
    torch.testing.assert_close(copy.prior_concentration(), learned.prior_concentration())


def test_prior_options_are_validated():
    with pytest.raises(ValueError, match="prior must be one of"):
        BayesianRoutedLM(CFG, prior="cauchy")
    with pytest.raises(ValueError, match="prior_mean must be one of"):
        BayesianRoutedLM(CFG, prior_mean="fit")
    with pytest.raises(ValueError, match="needs prior 'power'"):
        BayesianRoutedLM(CFG, prior="seed", prior_mean="learn")
    one = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=1, max_seq_len=8,
                       window=3, chunk_size=4, experts=("full",))
    with pytest.raises(ValueError, match="at least 2 experts"):
        BayesianRoutedLM(one)


def test_a_prior_below_the_guide_floor_warns_with_its_kl_floor(caplog):
    with caplog.at_level(logging.WARNING):
        model = BayesianRoutedLM(CFG, beta0=0.1, a_min=0.05)
    assert model.floor_kl() > 0.5
    assert "KL floor" in caplog.text and "--a-min" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model = BayesianRoutedLM(CFG, beta0=0.1, a_min=0.001)
    assert caplog.text == "" and model.floor_kl() == 0.0


def test_type_two_ml_of_the_prior_mean_recovers_a_known_mean():
    """The ELBO's prior term for (beta0, pi) is -sum_t KL(q_t || Dir(beta0 pi)); with guides
    concentrated on Dirichlet draws it is their log-likelihood. Maximising it over the model's
    own parameterisation (positive beta0, simplex pi) recovers the generating mean and
    precision, and agrees with Minka's full fit on the same statistics."""
    from bayes_router.core.dirichlet import dirichlet_kl, expected_log_alpha
    from bayes_router.inference.minka import fit_dirichlet

    true_mean, true_precision = torch.tensor([0.15, 0.6, 0.25]), 4.0
    torch.manual_seed(0)
    draws = torch.distributions.Dirichlet(true_precision * true_mean.double()).sample((4000,))
    draws = draws.clamp(min=1e-12)
    guides = 1e4 * draws / draws.sum(-1, keepdim=True)  # q_t concentrated at each draw
    model = BayesianRoutedLM(CFG, beta0="learn", beta0_init=1.0, prior_mean="learn")
    params = [p for n, p in model.named_parameters() if n in ("beta0_unconstrained",
                                                              "prior_mean_param_unconstrained")]
    optimiser = torch.optim.Adam(params, lr=0.05)
    for _ in range(600):
        optimiser.zero_grad()
        prior = model.prior_concentration()[0].double()
        loss = dirichlet_kl(guides, prior).mean()
        loss.backward()
        optimiser.step()
    prior = model.prior_concentration()[0].detach().double()
    fitted_precision, fitted_mean = float(prior.sum()), prior / prior.sum()
    torch.testing.assert_close(fitted_mean.float(), true_mean, atol=0.02, rtol=0)
    assert fitted_precision == pytest.approx(true_precision, rel=0.1)
    minka = fit_dirichlet(expected_log_alpha(guides).mean(0))
    assert minka.converged
    torch.testing.assert_close(prior, minka.precision * minka.mean, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("options, match", [
    ({"prior": "cauchy"}, "prior must be one of"),
    ({"prior_mean": "fit"}, "prior_mean must be one of"),
    ({"prior": "seed", "prior_mean": "learn"}, "prior_mean 'learn' needs prior 'power'"),
    ({"beta0": 0.0}, r"beta0 must be > 0, got 0.0"),
    ({"beta0": (1.0, -2.0)}, r"beta0 must be > 0, got \(1.0, -2.0\)"),
    ({"beta0": math.nan}, "beta0 must be > 0, got nan"),
    ({"beta0": "auto"}, "beta0 must be > 0, a list of values > 0, or 'learn'; got 'auto'"),
    ({"beta0": ("a",)}, r"beta0 must be a number > 0 or one per layer, got \('a',\)"),
    ({"beta0": 1e39}, r"beta0 must be finite in float32 \(at most 3.4e\+38\), got 1e\+39"),
    ({"beta0_init": 0.0}, "beta0_init must be a finite number > 0, got 0.0"),
    ({"beta0_init": 1e39}, "beta0_init must be finite in float32"),
    ({"a_min": 0.0}, "a_min must be a finite number > 0, got 0.0"),
    ({"eta": math.inf}, "eta must be a finite number, got inf"),
])
def test_the_configuration_and_the_model_refuse_a_prior_option_alike(options, match):
    """One rule per option (models/priors.check_prior_options): TrainConfig at its construction
    and BayesianRoutedLM at its own raise the same error for the same value."""
    from bayes_router.inference.train_config import TrainConfig

    with pytest.raises(ValueError, match=match) as from_config:
        TrainConfig(**options)
    with pytest.raises(ValueError, match=match) as from_model:
        BayesianRoutedLM(CFG, **options)
    assert str(from_config.value) == str(from_model.value)


def test_a_per_layer_beta0_must_match_the_layers_where_the_model_knows_them():
    from bayes_router.inference.train_config import TrainConfig

    assert TrainConfig(beta0=(1.0, 2.0, 3.0)).beta0 == (1.0, 2.0, 3.0)  # no LM to match yet
    with pytest.raises(ValueError, match=r"one number or one per layer, got 0 values \(\)"):
        TrainConfig(beta0=())
    for build in (lambda: BayesianRoutedLM(CFG, beta0=(1.0, 2.0, 3.0)),
                  lambda: BayesianRoutedLM(CFG).with_learned_beta0((1.0, 2.0, 3.0))):
        with pytest.raises(ValueError, match=r"one per layer \(2 layers\), got 3 values"):
            build()


def test_the_prior_in_force_is_the_public_functions_prior():
    """The model computes its prior without the public functions' checks (it checked its
    options once, at construction): the same numbers."""
    for prior, public in (("power", lambda c, b: compute_aware_prior(c, b, 0.5)),
                          ("seed", seed_prior)):
        model = BayesianRoutedLM(CFG, beta0=[0.7, 2.0], eta=0.5, prior=prior)
        torch.testing.assert_close(model.prior_concentration(),
                                   public(model.costs, torch.tensor([0.7, 2.0])))
