"""The gradient-variance lab: its summaries, its input checks, and every estimator on a tiny LM."""

import math

import numpy as np
import pyro
import pytest
import torch
from scipy.stats import chi2

from bayes_router.experiments.variance_lab import variance_along_training
from bayes_router.inference.estimators import estimator_names, get_estimator
from bayes_router.inference.objective import loss_and_surrogate
from bayes_router.inference.train import train
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig
from bayes_router.variance.gradient_stats import REFERENCE, add_relative, summarise_gradients
from bayes_router.variance.lm_variance import (
    gradient_variance,
    lab_model,
    parameter_groups,
    variance_vs_beta0,
    variance_vs_particles,
)
from bayes_router.variance.toy import toy_elbo_grad
from bayes_router.variance.toy_variance import toy_gradient_variance


@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


def tiny_cfg(data):
    return TinyLMConfig(vocab_size=data.vocab_size, d_model=16, n_heads=2, n_layers=2,
                        max_seq_len=16, window=4, chunk_size=8, controller_hidden=8)


def tiny_model(data, estimator=None, **kwargs):
    with pyro.settings.context(module_local_params=True):
        torch.manual_seed(0)
        estimator = None if estimator is None else get_estimator(estimator)
        model = BayesianRoutedLM(tiny_cfg(data), estimator=estimator, **kwargs)
        # move the controllers off their zero initialisation, so tokens differ
        for controller in model.controllers:
            torch.nn.init.normal_(controller.net[-1].weight, std=0.5)
    return model


def batch(data, batch_size=3, seq_len=16, seed=0):
    return data.sample_batch("train", batch_size, seq_len, torch.Generator().manual_seed(seed))


# -- the summaries, against a direct numpy computation ------------------------------------------


def test_summary_matches_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    draws = rng.normal(loc=[0.5, -2.0, 0.0, 3.0, 0.0], scale=[1.0, 0.5, 2.0, 0.0, 0.0],
                       size=(40, 5))  # column 3 deterministic and non-zero, column 4 always 0
    summary = summarise_gradients(draws, seconds=0.02)
    covariance = np.cov(draws, rowvar=False)
    assert summary.total_variance == pytest.approx(np.trace(covariance), rel=1e-12)
    assert summary.mean_norm == pytest.approx(np.linalg.norm(draws.mean(0)), rel=1e-12)
    snr = np.abs(draws[:, :3].mean(0)) / draws[:, :3].std(0, ddof=1)
    assert summary.median_snr == pytest.approx(np.median(np.r_[snr, np.inf]), rel=1e-12)
    assert summary.num_deterministic == 1
    assert summary.efficiency == pytest.approx(1 / (np.trace(covariance) * 0.02), rel=1e-12)
    assert (summary.num_draws, summary.num_parameters) == (40, 5)


def test_zero_variance_has_infinite_efficiency_and_unknown_time_none():
    draws = np.ones((5, 2))
    assert summarise_gradients(draws, 0.1).efficiency == math.inf
    assert math.isnan(summarise_gradients(draws).efficiency)
    assert summarise_gradients(np.arange(6.0)).num_parameters == 1


def test_relative_ratios():
    results = {REFERENCE: {"groups": {"phi": summarise_gradients(
                   np.array([[0.0], [2.0]]), 1.0).to_dict()}},
               "other": {"groups": {"phi": summarise_gradients(
                   np.array([[0.0], [1.0]]), 4.0).to_dict()}}}
    add_relative(results)
    relative = results["other"]["relative"]["phi"]
    assert relative["total_variance_ratio"] == pytest.approx(0.25)  # 0.5 / 2
    assert relative["seconds_ratio"] == pytest.approx(4.0)
    assert relative["efficiency_ratio"] == pytest.approx(1.0)  # 1/(0.5*4) over 1/(2*1)
    assert results[REFERENCE]["relative"]["phi"]["efficiency_ratio"] == 1.0


def test_toy_report_derives_bias_and_z_scores_from_the_draws():
    result = toy_gradient_variance(["reparam-analytic", "iwae"], num_draws=2000, seed=3)
    exact = toy_elbo_grad(torch.tensor(result["a"], dtype=torch.float64),
                          torch.tensor(result["counts"], dtype=torch.float64),
                          torch.tensor(result["prior"], dtype=torch.float64)).numpy()
    assert list(result["estimators"]) == [REFERENCE, "reparam-analytic", "iwae"]
    for entry in result["estimators"].values():
        bias = np.array(entry["mean"]) - exact
        assert np.allclose(entry["bias"], bias)
        assert np.allclose(entry["z"], bias / np.array(entry["standard_error"]))
        assert entry["p_value"] == pytest.approx(chi2.sf(entry["hotelling"], df=3))
    assert not result["estimators"]["iwae"]["unbiased"]
    assert result["estimators"]["iwae"]["max_abs_z"] > 10  # the IW bound's gradient


# -- bad input ----------------------------------------------------------------------------------


def test_fewer_than_two_draws_are_rejected(data):
    with pytest.raises(ValueError, match="M >= 2"):
        summarise_gradients(np.zeros((1, 3)))
    x, y = batch(data)
    with pytest.raises(ValueError, match=">= 2"):
        gradient_variance(tiny_model(data), x, y, num_draws=1)
    with pytest.raises(ValueError, match=">= 2"):
        toy_gradient_variance(["reparam-mc"], num_draws=1)


def test_unknown_estimator_is_rejected_listing_the_valid_ones(data):
    x, y = batch(data)
    with pytest.raises(ValueError) as info:
        gradient_variance(tiny_model(data), x, y, estimators=["reinforce"], num_draws=2)
    for name in estimator_names():
        assert name in str(info.value)


def test_dreg_with_one_particle_is_rejected_clearly(data):
    x, y = batch(data)
    with pytest.raises(ValueError, match=r"'dreg' does not apply with num_particles=1.*>= 2"):
        gradient_variance(tiny_model(data), x, y, estimators=["dreg"], num_particles=1,
                          num_draws=2)


def test_prior_free_model_is_rejected(data):
    from bayes_router.models.prior_free import PriorFreeRoutedLM

    x, y = batch(data)
    with pytest.raises(TypeError, match="BayesianRoutedLM"):
        gradient_variance(PriorFreeRoutedLM(tiny_cfg(data)), x, y, num_draws=2)


# -- the LM: every estimator trains, and the lab's numbers are finite ---------------------------


@pytest.mark.parametrize("name", estimator_names())
def test_every_estimator_takes_a_training_step_on_the_lm(data, name):
    estimator = get_estimator(name)
    model = tiny_model(data, estimator=name, beta0="learn")
    elbo = estimator.make_elbo(num_particles=max(2, estimator.min_particles),
                               vectorize_particles=True, max_plate_nesting=1)
    x, y = batch(data)
    with pyro.settings.context(module_local_params=True):
        loss, surrogate = loss_and_surrogate(elbo, model.model, model.guide, x, y,
                                             dataset_size=50)
        surrogate.backward()
    assert torch.isfinite(loss)
    for group, params in parameter_groups(model).items():
        grads = [p.grad for _, p in params if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), group
        assert sum(float(g.abs().sum()) for g in grads) > 0, group


@pytest.mark.parametrize("name", ["iwae", "dreg"])
def test_importance_weighted_estimators_train_in_the_loop(data, name):
    model_cfg = tiny_cfg(data)
    train_cfg = TrainConfig(estimator=name, num_particles=2, steps=2, batch_size=2, seq_len=16,
                            eval_every=2, eval_batches=1, dataset="unused")
    result = train(model_cfg, train_cfg, data, progress=False)
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in result.history)


@pytest.mark.parametrize("name", ["iwae", "dreg"])
def test_subsampling_scales_the_importance_weighted_bound_not_its_weights(data, name):
    """With the batch plate subsampled (N > B), the bound is N / B times the bound of the batch
    alone for the same draws; a scale inside the logsumexp would temper the weights instead."""
    model = tiny_model(data, estimator=name)
    elbo = get_estimator(name).make_elbo(num_particles=4, max_plate_nesting=1)
    x, y = batch(data)
    with pyro.settings.context(module_local_params=True):
        losses = []
        for dataset_size in (3, 300):
            torch.manual_seed(1)
            losses.append(float(elbo.loss_and_surrogate(model.model, model.guide, x, y,
                                                        dataset_size=dataset_size)[0]))
    assert losses[1] == pytest.approx(100 * losses[0], rel=1e-5)


def test_lab_model_has_the_same_loss_and_a_beta0_gradient(data):
    model = tiny_model(data, beta0=[0.5, 2.0])
    lab = lab_model(model)
    with pyro.settings.context(module_local_params=True):
        assert torch.allclose(lab.beta0, torch.tensor([0.5, 2.0]))
        elbo = get_estimator("reparam-mc").make_elbo(max_plate_nesting=1)
        x, y = batch(data)
        losses = []
        for m in (model, lab):
            torch.manual_seed(2)
            losses.append(float(loss_and_surrogate(elbo, m.model, m.guide, x, y)[0]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert "beta0" in parameter_groups(lab) and "beta0" not in parameter_groups(model)


def test_lm_lab_numbers_are_finite(data):
    model = tiny_model(data)
    x, y = batch(data)
    result = gradient_variance(model, x, y, dataset_size=40, num_draws=3, warmup=1)
    assert list(result["estimators"]) == list(estimator_names())
    for name, entry in result["estimators"].items():
        assert set(entry["groups"]) == {"phi", "theta", "beta0"}
        for group, summary in entry["groups"].items():
            assert summary["num_draws"] == 3
            for key in ("mean_norm", "total_variance", "seconds"):
                assert math.isfinite(summary[key]) and summary[key] >= 0, (name, group, key)
        assert entry["relative"]["phi"]["total_variance_ratio"] > 0
    # score-function gradients of the guide are far noisier than pathwise ones
    phi = {n: e["groups"]["phi"]["total_variance"] for n, e in result["estimators"].items()}
    assert phi["score"] > phi["reparam-mc"]


def test_particle_sweep_skips_counts_below_an_estimators_minimum(data):
    x, y = batch(data)
    sweep = variance_vs_particles(tiny_model(data), x, y, particles=[1, 2],
                                  estimators=["reparam-mc", "dreg"], num_draws=2, warmup=0)
    assert sweep["particles"] == [1, 2]
    assert set(sweep["estimators"]["dreg"][0]) == {"skipped"}
    assert sweep["estimators"]["dreg"][1]["num_particles"] == 2
    assert [p["num_particles"] for p in sweep["estimators"]["reparam-mc"]] == [1, 2]


def test_beta0_sweep_lists_each_estimators_points_in_the_order_of_its_values(data):
    """Point ``i`` is the lab at ``beta0_values[i]`` (sorted): the same seed draws the same
    gradients as a direct call at that value."""
    model, (x, y) = tiny_model(data), batch(data)
    options = dict(estimators=["reparam-mc"], num_draws=2, warmup=0, seed=3)
    sweep = variance_vs_beta0(model, x, y, beta0_values=[10.0, 0.1], **options)
    assert sweep["beta0_values"] == [0.1, 10.0]
    points = sweep["estimators"]["reparam-mc"]
    assert len(points) == 2
    for value, point in zip(sweep["beta0_values"], points, strict=True):
        direct = gradient_variance(model, x, y, beta0=value, **options)["estimators"]
        assert point["groups"]["beta0"]["total_variance"] == \
            direct["reparam-mc"]["groups"]["beta0"]["total_variance"]
    assert points[0]["groups"]["beta0"] != points[1]["groups"]["beta0"]


def test_along_training_measures_at_each_step(data, tmp_path):
    train_cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, eval_every=3, eval_batches=1,
                            checkpoint_every=3, dataset="unused")
    result = variance_along_training(tiny_cfg(data), train_cfg, data, tmp_path, [0, 2, 3],
                                     estimators=["reparam-analytic"], num_draws=2, warmup=0)
    assert result["steps"] == [0, 2, 3]
    points = result["estimators"]["reparam-analytic"]
    assert len(points) == 3 and all(p["groups"]["phi"]["num_draws"] == 2 for p in points)
    assert result["train_loss"][0] is None and all(math.isfinite(v)
                                                   for v in result["train_loss"][1:])
    assert (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        variance_along_training(tiny_cfg(data), train_cfg, data, tmp_path, [1],
                                estimators=["reparam-mc"], num_draws=2)
