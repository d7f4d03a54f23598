"""Static routing baselines: spec parsing, exact shares, and the likelihood-only Pyro pair."""

import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO

from bayes_router.models.config import TinyLMConfig
from bayes_router.models.static import StaticRoutedLM, hard_assignment, parse_static_router

CFG = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_seq_len=20, window=3,
                   chunk_size=4, controller_hidden=8)
EXPERTS = CFG.experts


# PyroModule parameters local to each module, no global parameter store
pytestmark = pytest.mark.usefixtures("local_params")


def test_parse_static_router():
    assert parse_static_router("fixed:local", EXPERTS) == ("fixed", (0.0, 0.0, 1.0))
    assert parse_static_router("fixed:0.2,0.5,0.3", EXPERTS) == ("fixed", (0.2, 0.5, 0.3))
    assert parse_static_router("soft:0.2,0.5,0.3", EXPERTS) == ("soft", (0.2, 0.5, 0.3))


@pytest.mark.parametrize("spec, match", [
    ("fixed:", "static router"), ("mix:0.5,0.5,0", "static router"),
    ("fixed:flash", "neither an expert"), ("fixed:0.5,0.5", "gives 2 shares for the 3"),
    ("fixed:0.5,0.6,0.1", "sum to 1"), ("soft:-0.5,1.0,0.5", ">= 0"),
    ("soft:full", "one-expert router"),
])
def test_bad_static_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_static_router(spec, EXPERTS)


def test_hard_assignment_has_exact_shares_per_layer_and_differs_between_layers():
    index = hard_assignment((0.2, 0.5, 0.3), 20, 2, seed=3)
    for layer in index:
        assert torch.bincount(layer, minlength=3).tolist() == [4, 10, 6]
    assert not torch.equal(index[0], index[1])
    torch.testing.assert_close(index, hard_assignment((0.2, 0.5, 0.3), 20, 2, seed=3))
    assert not torch.equal(index, hard_assignment((0.2, 0.5, 0.3), 20, 2, seed=4))
    # rounding: the shares still cover every position
    assert hard_assignment((1 / 3, 1 / 3, 1 / 3), 20, 1, seed=0).numel() == 20


@pytest.mark.parametrize("spec", ["fixed:full", "fixed:0.2,0.5,0.3", "soft:0.2,0.5,0.3"])
def test_static_lm_routes_as_specified(spec):
    model = StaticRoutedLM(CFG, spec, seed=1)
    assert len(model.controllers) == 0
    x = torch.randint(0, 11, (3, 12))
    out = model.predict(x)
    kind, shares = parse_static_router(spec, EXPERTS)
    for layer, r in enumerate(out.routing):
        w = r.applied_weights
        assert w.shape == (3, 12, 3)
        if kind == "soft":
            torch.testing.assert_close(w, torch.tensor(shares).expand(3, 12, 3))
        else:  # one-hot, the same for every sequence, position by position
            assert bool(((w == 0) | (w == 1)).all()) and bool((w.sum(-1) == 1).all())
            assert torch.equal(w[0], w[1])
            torch.testing.assert_close(w[0], model.weights[layer, :12])


def test_static_lm_elbo_is_the_log_likelihood_of_its_fixed_routing():
    model = StaticRoutedLM(CFG, "fixed:0.2,0.5,0.3", seed=0)
    x, y = torch.randint(0, 11, (2, 10)), torch.randint(0, 11, (2, 10))
    assert [n for n, s in poutine.trace(model.guide).get_trace(x, y).nodes.items()
            if s["type"] == "sample"] == []
    loss = Trace_ELBO().loss(model.model, model.guide, x, y)
    logits = model.lm(x, lambda layer, f: model.decision(layer, f)).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), y.reshape(-1),
                                                 reduction="sum")
    assert loss == pytest.approx(float(expected.detach()), rel=1e-5)


def test_hard_mode_of_a_fixed_router_is_its_soft_mode():
    model = StaticRoutedLM(CFG, "fixed:0.2,0.5,0.3", seed=0)
    x = torch.randint(0, 11, (2, 20))
    torch.testing.assert_close(model.predict(x, mode="hard").logits, model.predict(x).logits)


def test_one_expert_lm_works():
    cfg = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=1, max_seq_len=8,
                       window=3, chunk_size=4, experts=("local",))
    model = StaticRoutedLM(cfg, "fixed:local")
    out = model.predict(torch.randint(0, 11, (2, 8)), mode="gated", gate_threshold=0.5)
    assert out.logits.shape == (2, 8, 11)
    assert bool(out.routing[0].hard_mask.all())
