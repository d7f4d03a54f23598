"""The evidence-vs-commitment diagnostic: counterfactual gains against a direct recomputation,
and its verdicts on cases built to pass and to fail."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bayes_router.analysis.evidence import (
    counterfactual_gains,
    layer_evidence,
    summarise_layer,
)
from bayes_router.core.commitment import commitment_cost
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.router import RoutingDecision

CFG = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_seq_len=12, window=2,
                   chunk_size=4, controller_hidden=8, cost_preset="seed")


# PyroModule parameters local to each module, no global parameter store
pytestmark = pytest.mark.usefixtures("local_params")


def _model(beta0=1.0, bias=None):
    torch.manual_seed(0)
    model = BayesianRoutedLM(CFG, beta0=beta0)
    with torch.no_grad():
        for p in model.lm.parameters():  # experts that differ: a large random attention
            p.add_(0.5 * torch.randn_like(p))
        for c in model.controllers:
            c.net[-1].weight.normal_(0, 0.3)
            if bias is not None:
                c.net[-1].bias.copy_(torch.tensor(bias))
    return model.eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 11, (3, 10), generator=g), torch.randint(0, 11, (3, 10), generator=g)


def test_gains_match_a_direct_recomputation():
    model, (x, y) = _model(), _batch()
    out = model.predict(x)
    weights = [r.applied_weights for r in out.routing]
    tokens = torch.tensor([[0, 0], [1, 4], [2, 9], [1, 4]])
    candidates = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.2, 0.3, 0.5]])
    gains = counterfactual_gains(model, x, y, weights, tokens, layer=1, candidates=candidates,
                                 chunk=5)
    def loglik(ws, b):
        with torch.no_grad():
            logits = model.lm(x, lambda layer, f: RoutingDecision(ws[layer], ws[layer])).logits
        return float(-F.cross_entropy(logits[b], y[b], reduction="sum"))

    for j, (b, t) in enumerate(tokens.tolist()):
        for c, w in enumerate(candidates):
            # the token's new weights at layer 1 only; layer 0 and other tokens unchanged
            changed = [wl.clone() for wl in weights]
            changed[1][b, t] = w
            expected = loglik(changed, b) - loglik(weights, b)
            assert float(gains[j, c]) == pytest.approx(expected, abs=1e-4)
    assert gains.shape == (4, 3)  # the same token twice gives the same gains
    assert torch.equal(gains[1], gains[3])


def test_summary_of_a_case_built_to_fail_and_one_built_to_pass():
    levels = ("argmax", 0.5, 0.9)
    cost = np.array([[1.0, 1.5, 3.0], [0.0, 0.0, 0.5]])
    # fail: gains far below every cost, and the guide already at its prior (current KL 0)
    fail = {"gain": np.full((50, 2), -0.01), "cost": cost,
            "delta_elbo": -np.broadcast_to(cost, (50, 2, 3)) - 0.01}
    s = summarise_layer(fail, ["full", "linear"], levels)
    assert s["full"]["levels"]["0.9"]["share_gain_exceeds_cost"] == 0.0
    assert s["full"]["levels"]["argmax"]["share_elbo_rewards_move"] == 0.0
    # pass: 30 of 50 tokens gain 2 nats from full, above the argmax and 0.5 costs
    gain = np.zeros((50, 2))
    gain[:30, 0] = 2.0
    passing = {"gain": gain, "cost": cost, "delta_elbo": gain[:, :, None] - cost[None]}
    s = summarise_layer(passing, ["full", "linear"], levels)
    assert s["full"]["levels"]["argmax"]["share_gain_exceeds_cost"] == pytest.approx(0.6)
    assert s["full"]["levels"]["0.5"]["share_elbo_rewards_move"] == pytest.approx(0.6)
    assert s["full"]["levels"]["0.9"]["share_gain_exceeds_cost"] == 0.0
    assert s["full"]["gain_positive_share"] == pytest.approx(0.6)


def test_a_committed_guide_is_rewarded_for_moving_to_the_cheapest_commitment():
    """Built to pass: a guide far more committed to 'linear' than it needs to be pays a large KL;
    the cheapest guide with the same commitment pays less at almost no likelihood cost, so the
    ELBO rewards the move for every token. Built to fail: committing to 'full' under a strong
    prior (beta0 = 50) costs more than any gain."""
    model, (x, y) = _model(bias=[-6.0, 8.0, -6.0]), _batch()
    out = model.predict(x)
    weights = [r.applied_weights for r in out.routing]
    tokens = torch.tensor([[b, t] for b in range(3) for t in range(10)])
    prior, floor = model.prior_concentration().detach().double(), model.guide_floor().double()
    ev = layer_evidence(model, x, y, tokens, 0, weights, out.routing[0].decision.concentration,
                        prior[0], floor[0])
    s = summarise_layer(ev, CFG.experts)
    assert s["linear"]["levels"]["0.9"]["share_elbo_rewards_move"] == 1.0
    assert ev["cost"][1, 2] == pytest.approx(commitment_cost(prior[0].numpy(), 1, 0.9,
                                                             floor[0].numpy()).kl)
    strong = _model(beta0=50.0)
    out = strong.predict(x)
    ev = layer_evidence(strong, x, y, tokens, 0, [r.applied_weights for r in out.routing],
                        out.routing[0].decision.concentration,
                        strong.prior_concentration().detach().double()[0],
                        strong.guide_floor().double()[0])
    s = summarise_layer(ev, CFG.experts)
    assert s["full"]["levels"]["0.9"]["cost"] > 20
    assert s["full"]["levels"]["0.9"]["share_gain_exceeds_cost"] == 0.0
    assert s["full"]["levels"]["0.9"]["share_elbo_rewards_move"] == 0.0
