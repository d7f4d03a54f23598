"""The estimator registry, its contract, the Dirichlet samplers, and the generic site pattern."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import ELBO
from torch.distributions import constraints, kl_divergence

from bayes_router.inference.estimators import (
    ESTIMATORS,
    RSVI,
    DReG_ELBO,
    Estimator,
    RSVIDirichlet,
    estimator_names,
    get_estimator,
)
from bayes_router.inference.estimators._util import (
    attach_score_only_log_probs,
    path_log_prob,
    with_detached_values,
)
from bayes_router.variance.toy import toy_guide, toy_model

NAMES = ("reparam-mc", "reparam-analytic", "score", "score-baseline", "score-nn-baseline", "stl",
         "naive-gamma", "rsvi", "iwae", "dreg")
REPARAMETERISED = ("reparam-mc", "reparam-analytic", "stl", "naive-gamma", "rsvi", "iwae",
                   "dreg")
COUNTS = torch.tensor([6.0, 3.0, 1.0])
PRIOR = torch.tensor([0.5, 1.0, 1.5])


def test_registry_holds_exactly_the_named_estimators():
    assert estimator_names() == NAMES
    for name in NAMES:
        estimator = get_estimator(name)
        assert isinstance(estimator, Estimator) and estimator.name == name
        assert type(estimator) is ESTIMATORS[name]
        assert estimator.reference and isinstance(estimator.unbiased, bool)
        assert "References" in type(estimator).__doc__
        if not estimator.unbiased:
            assert ".. warning::" in type(estimator).__doc__


def test_unknown_estimator_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        get_estimator("reinforce")
    for name in NAMES:
        assert name in str(info.value)


def test_get_estimator_passes_options_and_instances():
    rsvi = get_estimator("rsvi", boost=2, score_correction=False)
    assert rsvi.boost == 2 and not rsvi.unbiased
    assert get_estimator(rsvi) is rsvi
    with pytest.raises(ValueError, match="boost"):
        get_estimator("rsvi", boost=0)


@pytest.mark.parametrize("name", NAMES)
def test_make_elbo_returns_a_pyro_elbo_with_the_requested_particles(name):
    estimator = get_estimator(name)
    elbo = estimator.make_elbo(num_particles=4, vectorize_particles=True)
    assert isinstance(elbo, ELBO)
    assert elbo.num_particles == 4 and elbo.vectorize_particles


@pytest.mark.parametrize("name", ["iwae", "dreg"])
def test_importance_weighted_estimators_need_two_particles(name):
    with pytest.raises(ValueError, match="does not apply"):
        get_estimator(name).make_elbo(num_particles=1)
    with pytest.raises(TypeError):
        get_estimator(name).make_elbo(num_particles=2.0)


def test_dreg_elbo_itself_rejects_one_particle():
    with pytest.raises(ValueError, match="does not apply"):
        DReG_ELBO(num_particles=1)


def test_dreg_does_not_apply_to_a_score_function_guide():
    elbo = get_estimator("dreg").make_elbo(num_particles=2, max_plate_nesting=1)

    def guide(counts, prior):
        toy_guide(counts, prior, estimator=get_estimator("score"))

    with pytest.raises(ValueError, match="does not apply"):
        elbo.loss_and_grads(toy_model, guide, COUNTS, PRIOR)


@pytest.mark.parametrize("name", NAMES)
def test_site_infer_is_a_fresh_dict(name):
    estimator = get_estimator(name)
    first = estimator.site_infer()
    first["mutated"] = True
    assert "mutated" not in estimator.site_infer()
    if name == "score-baseline":
        assert first["baseline"]["use_decaying_avg_baseline"]


@pytest.mark.parametrize("name", NAMES)
def test_dirichlet_family_is_a_dirichlet_with_the_estimators_gradient_path(name):
    concentration = torch.tensor([[0.3, 1.0, 4.0], [2.0, 2.0, 2.0]], requires_grad=True)
    family = get_estimator(name).dirichlet(concentration)
    assert isinstance(family, torch.distributions.Dirichlet)
    assert family.batch_shape == (2,) and family.event_shape == (3,)
    assert family.has_rsample == (name in REPARAMETERISED)
    value = family.rsample((5,)) if family.has_rsample else family.sample((5,))
    assert value.shape == (5, 2, 3) and constraints.simplex.check(value).all()
    assert value.requires_grad == family.has_rsample
    assert value.dtype == torch.float64  # float32 concentrations are sampled in float64
    reference = dist.Dirichlet(concentration.double())
    assert torch.allclose(family.log_prob(value), reference.log_prob(value))
    expanded = family.expand((4, 2)).to_event(1)
    assert type(expanded.base_dist) is type(family) and expanded.batch_shape == (4,)


@pytest.mark.parametrize("name", NAMES)
def test_analytic_kl_is_dispatched_for_every_dirichlet_family(name):
    q_concentration = torch.tensor([[0.3, 1.0, 4.0], [2.0, 2.0, 2.0]])
    p_concentration = torch.tensor([0.5, 0.25, 0.25]) * 2.0
    q = get_estimator(name).dirichlet(q_concentration).to_event(1)
    p = dist.Dirichlet(p_concentration.expand(2, 3)).to_event(1)
    expected = kl_divergence(torch.distributions.Dirichlet(q_concentration.double()),
                             torch.distributions.Dirichlet(p_concentration.double())).sum()
    p = dist.Dirichlet(p_concentration.double().expand(2, 3)).to_event(1)
    assert torch.allclose(kl_divergence(q, p), expected)


@pytest.mark.parametrize("name", ["naive-gamma", "rsvi"])
def test_custom_samplers_draw_from_the_right_dirichlet(name):
    concentration = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    samples = get_estimator(name).dirichlet(concentration).rsample((40_000,)).detach()
    reference = torch.distributions.Dirichlet(concentration)
    standard_error = reference.variance.sqrt() / 200.0
    assert ((samples.mean(0) - reference.mean).abs() < 4 * standard_error).all()
    assert torch.allclose(samples.var(0), reference.variance, rtol=0.05)
    mean_log = samples.log().mean(0)
    expected_log = torch.digamma(concentration) - torch.digamma(concentration.sum())
    log_error = samples.log().std(0) / 200.0
    assert ((mean_log - expected_log).abs() < 4 * log_error).all()


def test_rsvi_score_parts_survive_expand_and_to_event():
    concentration = torch.tensor([[0.3, 1.0, 4.0], [2.0, 2.0, 2.0]], requires_grad=True)
    fn = RSVI().dirichlet(concentration).expand((5, 2)).to_event(1).to_event(1)
    value = fn.rsample()
    log_prob, score_function, entropy_term = fn.score_parts(value)
    assert log_prob.shape == () and score_function.shape == ()
    assert score_function.requires_grad and torch.isfinite(score_function)
    (grad,) = torch.autograd.grad(score_function, concentration)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert isinstance(RSVIDirichlet(concentration, boost=3).expand((4, 2)), RSVIDirichlet)


def test_rsvi_without_correction_has_plain_score_parts():
    fn = RSVI(score_correction=False).dirichlet(torch.ones(3))
    _, score_function, _ = fn.score_parts(fn.rsample())
    assert isinstance(score_function, int) and score_function == 0


def test_score_function_samples_carry_no_gradient():
    concentration = torch.ones(3, requires_grad=True)
    value = get_estimator("score").dirichlet(concentration)()
    assert not value.requires_grad


def test_path_log_prob_carries_the_path_derivative_only():
    """For one site the path term is d log q(z(c); sg(c)) / dc, written here by hand."""
    concentration = torch.tensor([[2.0, 3.0, 4.0]], dtype=torch.float64, requires_grad=True)

    def guide():
        pyro.sample("alpha_0", dist.Dirichlet(concentration).to_event(1))

    guide_trace = poutine.trace(guide).get_trace()
    guide_trace.compute_score_parts()
    attach_score_only_log_probs(guide, guide_trace, (), {},
                                frozen=with_detached_values(guide_trace))
    site = guide_trace.nodes["alpha_0"]
    log_prob = path_log_prob(site)
    assert torch.allclose(log_prob, site["log_prob"])
    (path,) = torch.autograd.grad(log_prob, concentration, retain_graph=True)
    by_hand = dist.Dirichlet(concentration.detach()).log_prob(site["value"]).sum()
    (expected,) = torch.autograd.grad(by_hand, concentration, retain_graph=True)
    torch.testing.assert_close(path, expected)
    (total,) = torch.autograd.grad(site["log_prob"], concentration)
    assert not torch.allclose(path, total)  # the score term was removed


# -- the generic site pattern: several alpha sites, token event dims, a subsampled batch plate --

BATCH, TOKENS, K, DATASET = 3, 4, 3, 10


def pattern_model(y, prior):
    with pyro.plate("batch", DATASET, subsample=torch.arange(BATCH), dim=-1):
        alpha_0 = pyro.sample("alpha_0", dist.Dirichlet(prior.expand(TOKENS, K)).to_event(1))
        alpha_1 = pyro.sample("alpha_1", dist.Dirichlet(prior.expand(TOKENS, K)).to_event(1))
        pyro.sample("obs", dist.Categorical(probs=(alpha_0 + alpha_1) / 2).to_event(1), obs=y)


def pattern_guide(y, prior, estimator):
    weight = pyro.param("weight", 2 * torch.ones(BATCH, TOKENS, K),
                        constraint=constraints.positive)
    with pyro.plate("batch", DATASET, subsample=torch.arange(BATCH), dim=-1):
        alpha_0 = pyro.sample("alpha_0", estimator.dirichlet(weight).to_event(1),
                              infer=estimator.site_infer())
        pyro.sample("alpha_1", estimator.dirichlet(weight * (1 + alpha_0)).to_event(1),
                    infer=estimator.site_infer())  # the second layer depends on the first


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_estimators_are_generic_over_the_site_pattern(name, vectorize):
    estimator = get_estimator(name)
    y = torch.randint(0, K, (BATCH, TOKENS))
    for num_particles in sorted({estimator.min_particles, 3}):
        pyro.clear_param_store()
        elbo = estimator.make_elbo(num_particles=num_particles, vectorize_particles=vectorize)

        def guide(y, prior):
            pattern_guide(y, prior, estimator)

        with poutine.trace(param_only=True) as capture:
            loss = elbo.loss_and_grads(pattern_model, guide, y, PRIOR)
        grad = pyro.get_param_store().get_param("weight").unconstrained().grad
        assert torch.isfinite(torch.tensor(loss))
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        if name == "score-nn-baseline":
            nets = [n for n in capture.trace.nodes if n.startswith("nn_baseline.")]
            assert any("alpha_0" in n for n in nets) and any("alpha_1" in n for n in nets)


# -- path-derivative estimators replay the guide: a randomly subsampled plate must replay its rows

ROWS, SUBSAMPLE = 20, 5


def subsampled_model(counts, prior):
    with pyro.plate("batch", ROWS, subsample_size=SUBSAMPLE, dim=-1) as rows:
        alpha = pyro.sample("alpha_0", dist.Dirichlet(prior.expand(SUBSAMPLE, 1, 3)).to_event(1))
        pyro.sample("obs", dist.Categorical(logits=alpha.log()).to_event(1),
                    obs=counts[rows].unsqueeze(-1))


def subsampled_guide(counts, prior, estimator):
    # per-row exact posterior: Dir(prior + onehot(observation))
    posterior = pyro.param("posterior", prior + torch.nn.functional.one_hot(counts, 3),
                           constraint=constraints.positive)
    with pyro.plate("batch", ROWS, subsample_size=SUBSAMPLE, dim=-1) as rows:
        pyro.sample("alpha_0", estimator.dirichlet(posterior[rows].unsqueeze(-2)).to_event(1))


@pytest.mark.parametrize("name", ["stl", "dreg"])
def test_path_derivatives_replay_the_subsampled_rows(name):
    """At the exact per-row posterior the path derivative is zero on every row; a replay that
    drew other rows would score the sample under another row's guide and leave a gradient."""
    estimator = get_estimator(name)
    counts = torch.randint(0, 3, (ROWS,), generator=torch.Generator().manual_seed(0))
    prior = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    elbo = estimator.make_elbo(num_particles=estimator.min_particles, max_plate_nesting=1)
    for _ in range(5):
        pyro.clear_param_store()
        elbo.loss_and_grads(subsampled_model, lambda c, p: subsampled_guide(c, p, estimator),
                            counts, prior)
        grad = pyro.get_param_store().get_param("posterior").unconstrained().grad
        assert grad.abs().max() < 1e-10


def test_dreg_refuses_partially_reparameterised_sites():
    elbo = get_estimator("dreg").make_elbo(num_particles=2, max_plate_nesting=1)
    rsvi = get_estimator("rsvi")

    def guide(counts, prior):
        a = pyro.param("a", torch.ones(3), constraint=constraints.positive)
        with pyro.plate("batch", 1, dim=-1):
            pyro.sample("alpha_0", rsvi.dirichlet(a.expand(1, 1, 3)).to_event(1))

    with pytest.raises(ValueError, match="fully reparameterised"):
        elbo.loss_and_grads(toy_model, guide, COUNTS, PRIOR)


def test_neural_baseline_nets_are_the_same_in_every_process(monkeypatch):
    """The learned baselines' nets start from the site's name, not the run's random stream:
    built under two different global seeds they are equal (so every rank of a data-parallel
    run starts from one net), and building them leaves the global stream where it was, the
    accelerators' streams too (never reseeded: the fork restores only the CPU's)."""
    from bayes_router.inference.estimators.score_nn_baseline import NeuralBaselineTraceGraph_ELBO

    reseeded = []
    for module in (torch.cuda, torch.mps, getattr(torch, "xpu", None)):
        for name in ("manual_seed", "manual_seed_all"):
            if module is not None and hasattr(module, name):
                monkeypatch.setattr(module, name, lambda *a, _n=name: reseeded.append(_n))
    concentration = torch.ones(4, 3)
    nets, draws = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = torch.rand(3)
        torch.manual_seed(seed)
        elbo = NeuralBaselineTraceGraph_ELBO(hidden=8)
        pyro.clear_param_store()
        nets.append(elbo._baseline_net("alpha_0", concentration))
        draws.append(torch.equal(torch.rand(3), expected))
    assert all(draws)
    reseeded.clear()  # the test's own torch.manual_seed calls reseed every device
    other = NeuralBaselineTraceGraph_ELBO(hidden=8)._baseline_net("alpha_1", concentration)
    assert reseeded == []
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(other.net[0].weight, nets[0].net[0].weight)  # one net per site
