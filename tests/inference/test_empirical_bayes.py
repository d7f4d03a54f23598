"""Minka's M-step for the Dirichlet precision (and full concentration) on known Dirichlets."""

import logging
import math

import pytest
import torch

from bayes_router.core.dirichlet import expected_log_alpha
from bayes_router.inference.empirical_bayes import fit_beta0_minka
from bayes_router.inference.minka import (
    fit_dirichlet,
    fit_precision,
    fit_precision_from_samples,
    inverse_digamma,
    precision_objective,
)

PI = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
PRECISIONS = [0.1, 1.0, 10.0, 100.0]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_recovers_the_precision_from_exact_statistics(precision):
    result = fit_precision(expected_log_alpha(precision * PI), PI)
    assert result.converged and result.n_iter < 20
    assert result.precision == pytest.approx(precision, rel=1e-8)
    assert result.objective == pytest.approx(
        precision_objective(precision, expected_log_alpha(precision * PI), PI))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_recovers_the_precision_from_20k_samples(precision):
    generator = torch.Generator().manual_seed(int(precision * 10))
    concentration = precision * PI
    gammas = torch._standard_gamma(concentration.expand(20_000, 3), generator=generator)
    samples = gammas / gammas.sum(-1, keepdim=True)  # float64: no underflow even at s = 0.1
    result = fit_precision_from_samples(samples, PI)
    assert result.converged
    assert result.precision == pytest.approx(precision, rel=0.02)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fit_dirichlet_recovers_mean_and_precision_from_exact_statistics(precision):
    fit = fit_dirichlet(expected_log_alpha(precision * PI))
    assert fit.converged
    assert torch.allclose(fit.concentration, precision * PI, rtol=1e-7)
    assert fit.precision == pytest.approx(precision, rel=1e-7)
    assert torch.allclose(fit.mean, PI)


@pytest.mark.parametrize("init", [1e-12, 1e-3, 1e3, 1e12])
def test_newton_converges_from_far_starting_points(init):
    stats = expected_log_alpha(10.0 * PI)
    result = fit_precision(stats, PI, init=init)
    assert result.converged and result.precision == pytest.approx(10.0, rel=1e-8)


def test_fit_is_a_maximum_of_the_objective():
    stats = expected_log_alpha(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    result = fit_precision(stats, PI)
    for factor in (0.9, 0.99, 1.01, 1.1):
        assert precision_objective(result.precision * factor, stats, PI) < result.objective


def test_iteration_cap_reports_non_convergence_without_nan(caplog):
    with caplog.at_level(logging.WARNING):
        result = fit_precision(expected_log_alpha(10.0 * PI), PI, init=1e-12, max_iter=2)
    assert not result.converged and result.message
    assert math.isfinite(result.precision) and math.isfinite(result.objective)
    assert "no convergence" in caplog.text


def test_expected_log_alpha_matches_monte_carlo():
    concentration = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    samples = torch.distributions.Dirichlet(concentration).sample((50_000,))
    log_samples = samples.log()
    error = (log_samples.mean(0) - expected_log_alpha(concentration)).abs()
    assert (error < 4 * log_samples.std(0) / 50_000**0.5).all()


def test_inverse_digamma_inverts_digamma():
    x = torch.tensor([1e-3, 0.1, 1.0, 7.5, 1e4], dtype=torch.float64)
    assert torch.allclose(inverse_digamma(torch.digamma(x)), x, rtol=1e-10)


def test_zeros_are_clamped_and_logged(caplog):
    generator = torch.Generator().manual_seed(3)
    gammas = torch._standard_gamma((0.1 * PI).expand(20_000, 3), generator=generator)
    samples = gammas / gammas.sum(-1, keepdim=True)
    smallest = samples.argmin(-1)[:5]
    samples[torch.arange(5), smallest] = 0.0  # exact zeros, as float32 underflow produces
    with caplog.at_level(logging.WARNING):
        result = fit_precision_from_samples(samples, PI)
    assert "clamped 5 of" in caplog.text
    assert result.converged and math.isfinite(result.precision)
    assert result.precision == pytest.approx(0.1, rel=0.02)


def test_identical_rows_report_an_unbounded_likelihood(caplog):
    with caplog.at_level(logging.WARNING):
        result = fit_precision_from_samples(PI.expand(4, 3), PI)
    assert result.precision == math.inf and not result.converged
    assert "no finite maximiser" in result.message and "identical" in caplog.text


def test_rows_not_summing_to_one_are_rejected():
    samples = torch.distributions.Dirichlet(PI * 5).sample((10,))
    samples[3] *= 1.01
    with pytest.raises(ValueError, match="1 of 10 rows"):
        fit_precision_from_samples(samples, PI)


@pytest.mark.parametrize("samples, match", [
    (torch.tensor([[0.5, 0.5, 0.0, 0.0]]), "pi must have shape"),
    (torch.tensor([[1.2, -0.2, 0.0]]), "non-negative"),
    (torch.tensor([[float("nan"), 0.5, 0.5]]), "finite"),
    (torch.tensor([0.5, 0.3, 0.2]), r"shape \(N, K\)"),
])
def test_bad_samples_are_rejected(samples, match):
    with pytest.raises(ValueError, match=match):
        fit_precision_from_samples(samples, PI)


def test_bad_statistics_and_means_are_rejected():
    with pytest.raises(ValueError, match="log-proportions"):
        fit_precision(torch.tensor([0.1, -1.0, -2.0]), PI)
    with pytest.raises(ValueError, match="log-proportions"):
        fit_precision(PI.log(), PI)  # infinitely concentrated: exp(stats) sums to 1
    with pytest.raises(ValueError, match="sum to 1"):
        fit_precision(expected_log_alpha(PI), torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="init"):
        fit_precision(expected_log_alpha(PI), PI, init=-1.0)
    with pytest.raises(ValueError, match="concentration"):
        expected_log_alpha(torch.tensor([1.0, 0.0]))


# -- committed (near one-hot) Dirichlets: components of very different sizes ------------------

COMMITTED = [(50.0, 0.05, 0.05), (50.0, 0.05), (0.05, 100.0), (1e-3, 1e3), (1e-4, 1e-4, 1e-4),
             (1e4, 2e4, 1e4)]


@pytest.mark.parametrize("true", COMMITTED, ids=str)
def test_fit_dirichlet_recovers_committed_dirichlets(true):
    """Exact sufficient statistics E[log alpha] = psi(a) - psi(a0) of Dir(true): the maximiser
    is ``true`` itself (the Dirichlet MLE from its own expected statistics)."""
    true = torch.tensor(true, dtype=torch.float64)
    fit = fit_dirichlet(expected_log_alpha(true))
    assert fit.converged and fit.message == "" and fit.n_iter < 100
    torch.testing.assert_close(fit.concentration, true, rtol=1e-6, atol=0.0)
    assert fit.objective == pytest.approx(
        float(torch.lgamma(true.sum()) - torch.lgamma(true).sum()
              + ((true - 1) * expected_log_alpha(true)).sum()), rel=1e-9)


def test_minka_m_step_reports_the_convergence_of_every_fit():
    committed = torch.tensor([[50.0, 0.05, 0.05]], dtype=torch.float64).expand(10, 3)
    result = fit_beta0_minka([committed, 2 * PI.expand(5, 3)], PI, update_pi=True)
    assert result["full_precision"][0] == pytest.approx(50.1, rel=1e-6)
    assert result["full_precision"][1] == pytest.approx(2.0, rel=1e-6)
    assert result["full_converged"] == [True, True] and result["full_message"] == ["", ""]
    assert len(result["converged"]) == len(result["message"]) == 2


def test_fit_dirichlet_iteration_cap_is_reported(caplog):
    with caplog.at_level(logging.WARNING):
        fit = fit_dirichlet(expected_log_alpha(torch.tensor([50.0, 0.05, 0.05])), max_iter=2)
    assert not fit.converged and "no convergence in 2 iterations" in fit.message
    assert "fit_dirichlet" in caplog.text
    assert torch.isfinite(fit.concentration).all() and bool((fit.concentration > 0).all())


def test_underflow_clamping_at_small_precision_is_called_unreliable(caplog):
    """At s = 0.01 a fraction of float64 draws underflows and the estimate is far off: the
    warning must say so instead of calling the clamp negligible."""
    generator = torch.Generator().manual_seed(0)
    gammas = torch._standard_gamma((0.01 * PI).expand(20_000, 3), generator=generator)
    samples = gammas / gammas.sum(-1, keepdim=True)
    with caplog.at_level(logging.WARNING):
        result = fit_precision_from_samples(samples, PI)
    assert bool((samples <= torch.finfo(torch.float64).tiny).any())
    assert "unreliable" in caplog.text
    assert result.precision > 1.05 * 0.01  # the documented upward bias is real
