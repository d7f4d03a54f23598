"""Calibration of the routing decisions (analysis/evidence.py): the argmax probability against
the Beta closed form and torch's Dirichlet sampler, and the decision calibration against cases
built by hand."""

import math

import numpy as np
import pytest
import torch
from scipy.special import betainc

from bayes_router.analysis.evidence import argmax_probability, decision_calibration

DRAWS = 20_000
TOLERANCE = 4 * 0.5 / math.sqrt(DRAWS)


@pytest.mark.parametrize("a", [(3.0, 1.0), (1.2, 1.0), (0.05, 0.04), (40.0, 35.0), (0.3, 2.0)])
def test_the_argmax_probability_of_a_beta_is_its_tail(a):
    """K = 2: the argmax ``j`` of the mean has ``P(alpha_j > 1/2) = 1 - I_{1/2}(a_j, a_other)``."""
    j = int(np.argmax(a))
    expected = 1 - betainc(a[j], a[1 - j], 0.5)
    assert argmax_probability(np.array([a]), draws=DRAWS)[0] == pytest.approx(
        expected, abs=TOLERANCE)


def test_the_argmax_probability_matches_torchs_sampler():
    rng = np.random.default_rng(0)
    a = np.exp(rng.normal(size=(6, 3)))
    ours = argmax_probability(a, draws=DRAWS, seed=1)
    torch.manual_seed(0)
    alpha = torch.distributions.Dirichlet(torch.tensor(a)).sample((DRAWS,))  # (S, n, K)
    theirs = (alpha.argmax(-1) == torch.tensor(a.argmax(1))).double().mean(0).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2 * TOLERANCE)
    assert np.all(ours >= 1 / 3 - TOLERANCE)  # the mean's argmax is the likeliest largest


def _decisions(confidence: float, n: int, n_right: int, K: int = 3):
    """``n`` tokens whose argmax (expert 0) has weight ``confidence``; ``n_right`` of them are
    right (best = 0), the rest have best = 1."""
    rest = (1 - confidence) / (K - 1)
    weights = np.full((n, K), rest)
    weights[:, 0] = confidence
    best = np.r_[np.zeros(n_right, int), np.ones(n - n_right, int)]
    return weights, best


def test_the_decision_ece_of_a_built_case():
    """Half the tokens at confidence 0.85 with 85 % right (gap 0), half at 0.95 with 65 % right
    (gap 0.3): ECE 0.15; the uncertainty that is 1 exactly on the wrong ones has AUROC 1."""
    w1, b1 = _decisions(0.85, 100, 85)
    w2, b2 = _decisions(0.95, 100, 65)
    weights, best = np.r_[w1, w2], np.r_[b1, b2]
    wrong = (best != 0).astype(float)
    result = decision_calibration(best, weights, {"oracle": wrong, "inverted": -wrong},
                                  argmax_prob=np.full(200, 0.75))
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["confidence"]["argmax_weight"]["ece"] == pytest.approx(0.15)
    assert result["confidence"]["argmax_weight"]["mean"] == pytest.approx(0.9)
    assert result["confidence"]["argmax_probability"]["ece"] == pytest.approx(0.0, abs=1e-12)
    assert result["auroc_wrong"] == {"oracle": 1.0, "inverted": 0.0}
    assert 0.35 < result["auroc_wrong_random"] < 0.65
    assert result["best_share"] == pytest.approx([0.75, 0.25, 0.0])
    assert result["chosen_share"] == pytest.approx([1.0, 0.0, 0.0])


def test_tokens_without_a_right_expert_are_skipped():
    weights, best = _decisions(0.9, 10, 9)
    best[:5] = -1  # 4 of the right ones and ... none of the wrong one
    result = decision_calibration(best, weights, {"u": np.arange(10.0)})
    assert result["n_tokens"] == 5 and result["accuracy"] == pytest.approx(4 / 5)
    all_right = decision_calibration(np.zeros(10, int), weights, {"u": np.arange(10.0)})
    assert math.isnan(all_right["auroc_wrong"]["u"])  # no wrong decision to pick out


@pytest.mark.parametrize("best, message", [
    (np.full(4, -1), "no defined expert"),
    (np.array([0, 1, 3, 0]), "best must hold expert indices in \\[0, 3\\)"),
    (np.zeros(3, int), "same length|length"),
])
def test_bad_decisions_are_refused(best, message):
    weights, _ = _decisions(0.9, 4, 4)
    with pytest.raises(ValueError, match=message):
        decision_calibration(best, weights, {"u": np.zeros(4)})


def test_bad_concentrations_are_refused():
    with pytest.raises(ValueError, match="positive finite"):
        argmax_probability(np.array([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="draws must be an integer >= 1"):
        argmax_probability(np.ones((1, 2)), draws=0)


def test_oracle_labels_name_the_models_experts():
    from bayes_router.analysis.evidence import oracle_experts
    from bayes_router.data.synthetic import ORACLE_LABELS

    labels = np.array([-1, *range(len(ORACLE_LABELS))])
    experts = ("local", "full")  # a model without linear
    expected = [-1] + [experts.index(n) if n in experts else -1 for n in ORACLE_LABELS]
    assert oracle_experts(labels, experts).tolist() == expected
    with pytest.raises(ValueError, match="oracle must hold label ids"):
        oracle_experts(np.array([len(ORACLE_LABELS)]), experts)


def test_the_argmax_probability_is_the_same_in_chunks(monkeypatch):
    import bayes_router.analysis.evidence as evidence

    a = np.exp(np.random.default_rng(1).normal(size=(50, 3)))
    whole = argmax_probability(a, draws=64, seed=2)
    monkeypatch.setattr(evidence, "CHUNK_ENTRIES", 64 * 3 * 7)  # 7 rows at a time
    chunked = argmax_probability(a, draws=64, seed=2)
    assert chunked.shape == (50,)
    assert np.all((chunked >= 0) & (chunked <= 1))
    # one generator drawn in another order: equal in distribution, not entry by entry
    assert abs(chunked.mean() - whole.mean()) < 0.05
