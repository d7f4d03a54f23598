"""ELBO surgery (core/elbo_surgery.py) against its closed limits, quadrature of the Beta case, and
an independent Monte Carlo of KL(qbar || p) through torch's Dirichlet."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from bayes_router.core.dirichlet import dirichlet_kl
from bayes_router.core.elbo_surgery import split_kl

PRIOR = torch.tensor([1.5, 0.8, 2.0], dtype=torch.float64)


def test_a_single_token_carries_no_information():
    a = torch.tensor([[3.0, 0.4, 1.2]], dtype=torch.float64)
    split = split_kl(a, PRIOR)
    assert split.information == 0.0 and split.information_se == 0.0
    assert split.marginal_kl == split.kl == pytest.approx(float(dirichlet_kl(a, PRIOR)[0]))


def test_identical_tokens_carry_no_information():
    a = torch.tensor([0.3, 5.0, 1.1], dtype=torch.float64).expand(200, 3)
    split = split_kl(a, PRIOR, subsample=64)
    assert abs(split.information) < 1e-12
    assert split.marginal_kl == pytest.approx(split.kl, abs=1e-12)
    assert split.n_tokens == 200 and split.n_subsample == 64


@pytest.mark.parametrize("n", [2, 3])
def test_tokens_that_do_not_overlap_carry_log_n(n):
    a = torch.ones(n, 3, dtype=torch.float64) + 2000 * torch.eye(3, dtype=torch.float64)[:n]
    split = split_kl(a, PRIOR, draws=16)
    assert split.information == pytest.approx(math.log(n), abs=1e-9)
    assert split.marginal_kl == pytest.approx(split.kl - math.log(n), abs=1e-9)


BETAS = [(2.0, 8.0), (8.0, 2.0), (5.0, 5.0), (1.3, 1.1)]
BETA_PRIOR = (1.5, 1.5)


def _quadrature_information(types, weights) -> float:
    """``I = sum_t w_t KL(q_t || qbar)`` for Beta types, by adaptive quadrature."""
    def mixture(x):
        return sum(w * stats.beta.pdf(x, *t) for t, w in zip(types, weights, strict=True))

    total = 0.0
    for t, w in zip(types, weights, strict=True):
        value, _ = integrate.quad(
            lambda x, t=t: stats.beta.pdf(x, *t) * (stats.beta.logpdf(x, *t)
                                                     - math.log(mixture(x))),
            0, 1, limit=200, points=[0.5])
        total += w * value
    return total


def _beta_tokens(counts) -> torch.Tensor:
    return torch.cat([torch.tensor(t, dtype=torch.float64).expand(c, 2)
                      for t, c in zip(BETAS, counts, strict=True)])


def test_the_beta_case_equals_quadrature():
    """Tokens in exact proportion to four Beta types: the subsample's mixture is the population's
    and the estimate agrees with quadrature within its standard error."""
    counts = (60, 60, 120, 60)
    split = split_kl(_beta_tokens(counts), torch.tensor(BETA_PRIOR, dtype=torch.float64),
                     subsample=512, draws=64, seed=3)
    weights = np.array(counts) / sum(counts)
    expected = _quadrature_information(BETAS, weights)
    assert 0.1 < expected < math.log(4)  # a case with overlap: neither limit
    assert abs(split.information - expected) < 4 * split.information_se + 1e-3
    assert split.information_se < 0.005
    # and the closed-form mean KL matches quadrature too, so marginal_kl = KL(qbar || p) does
    prior = stats.beta(*BETA_PRIOR)
    mean_kl = sum(w * integrate.quad(lambda x, t=t: stats.beta.pdf(x, *t) * (
        stats.beta.logpdf(x, *t) - prior.logpdf(x)), 0, 1, limit=200)[0]
        for t, w in zip(BETAS, weights, strict=True))
    assert split.kl == pytest.approx(mean_kl, rel=1e-6)


def test_the_estimate_is_consistent_as_the_subsample_grows():
    """20,000 tokens drawn from the four Beta types: random subsamples of M tokens err (over
    seeds) far more at M = 8 than at M = 1024, where the error is within a few hundredths."""
    rng = np.random.default_rng(0)
    types = rng.choice(len(BETAS), 20_000, p=[0.2, 0.2, 0.4, 0.2])
    tokens = torch.tensor(np.array(BETAS)[types])
    expected = _quadrature_information(BETAS, [0.2, 0.2, 0.4, 0.2])
    prior = torch.tensor(BETA_PRIOR, dtype=torch.float64)

    def error(m):
        return np.mean([abs(split_kl(tokens, prior, subsample=m, draws=8, seed=s).information
                            - expected) for s in range(6)])

    small, large = error(8), error(1024)
    assert large < small / 4
    assert large < 0.02


def test_the_marginal_kl_equals_an_independent_monte_carlo():
    """``KL(qbar || p) = E_qbar[log qbar - log p]`` sampled directly with torch's Dirichlet (a
    different sampler and density), against the split's ``kl - I``."""
    torch.manual_seed(0)
    a = torch.exp(torch.randn(150, 3, dtype=torch.float64)) * 2
    split = split_kl(a, PRIOR, subsample=150, draws=64, seed=1)
    mixture = torch.distributions.Dirichlet(a)
    tokens = torch.randint(0, 150, (20_000,))
    alpha = torch.distributions.Dirichlet(a[tokens]).sample()
    log_qbar = torch.logsumexp(mixture.log_prob(alpha[:, None, :]), dim=1) - math.log(150)
    terms = log_qbar - torch.distributions.Dirichlet(PRIOR).log_prob(alpha)
    direct, direct_se = float(terms.mean()), float(terms.std() / math.sqrt(len(terms)))
    assert abs(split.marginal_kl - direct) < 4 * math.hypot(split.information_se, direct_se)
    assert split.information + split.marginal_kl == pytest.approx(split.kl, abs=1e-12)


def test_float32_concentrations_at_the_guide_floor_give_finite_parts():
    a = torch.tensor([[0.05, 0.05, 1.0], [0.02, 3.0, 0.05], [0.01, 0.01, 0.01]],
                     dtype=torch.float32).repeat(30, 1)
    split = split_kl(a, PRIOR.float(), draws=8)
    assert all(math.isfinite(v) for v in (split.kl, split.information, split.marginal_kl))
    assert 0 <= split.information <= math.log(split.n_subsample) + 1e-12


@pytest.mark.parametrize("kwargs, message", [
    ({"prior": torch.ones(2)}, "prior must have shape \\(3,\\)"),
    ({"prior": torch.tensor([1.0, 0.0, 1.0])}, "prior must hold positive finite"),
    ({"concentration": torch.zeros(0, 3)}, "concentration holds no token"),
    ({"concentration": torch.tensor([[1.0, -1.0, 1.0]])}, "positive finite"),
    ({"subsample": 0}, "subsample must be an integer >= 1"),
    ({"draws": 1.5}, "draws must be an integer >= 1"),
])
def test_bad_input_is_refused(kwargs, message):
    arguments = {"concentration": torch.ones(4, 3), "prior": PRIOR} | kwargs
    concentration, prior = arguments.pop("concentration"), arguments.pop("prior")
    with pytest.raises(ValueError, match=message):
        split_kl(concentration, prior, **arguments)


@pytest.mark.parametrize("subsample", [300, 60])
def test_the_standard_error_matches_the_spread_over_seeds(subsample):
    """All 300 tokens (the draws' noise only) and a subsample of 60 (the subsample's noise too):
    the reported standard error is within a factor 1.5 of the estimates' spread over 40 seeds."""
    tokens = _beta_tokens((60, 60, 120, 60))
    prior = torch.tensor(BETA_PRIOR, dtype=torch.float64)
    splits = [split_kl(tokens, prior, subsample=subsample, draws=4, seed=s) for s in range(40)]
    spread = np.std([s.information for s in splits], ddof=1)
    reported = np.mean([s.information_se for s in splits])
    assert spread / 1.5 < reported < spread * 1.5
