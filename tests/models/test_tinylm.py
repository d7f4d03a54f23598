"""TinyLM: causality end to end, hard routing of the whole LM, particles, bad token ids."""

import pytest
import torch
import torch.nn.functional as F

from bayes_router.models.config import TinyLMConfig
from bayes_router.models.router import RoutingDecision
from bayes_router.models.tinylm import FixedRouting, TinyLM

CFG = TinyLMConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=2, window=3, chunk_size=4,
                   max_seq_len=24)


class SoftmaxRouting:
    """A deterministic feature-dependent router (so causality is tested through the features)."""

    def __init__(self, feature_dim, K=3):
        self.proj = torch.randn(feature_dim, K)

    def __call__(self, layer, features):
        w = torch.softmax(features @ self.proj, -1)
        return RoutingDecision(weights=w, mean=w)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_lm_is_causal(mode):
    lm = TinyLM(CFG)
    router = SoftmaxRouting(lm.feature_dim)
    x = torch.randint(0, 20, (2, 24))
    x2 = x.clone()
    x2[:, 12:] = torch.randint(0, 20, (2, 12))
    a = lm(x, router, mode=mode).logits
    b = lm(x2, router, mode=mode).logits
    assert (a[:, :12] - b[:, :12]).abs().max() < 1e-6


def test_whole_lm_hard_equals_soft_one_hot():
    lm = TinyLM(CFG).double()
    x = torch.randint(0, 20, (3, 17))
    one_hot = [F.one_hot(torch.randint(0, 3, (3, 17)), 3).double() for _ in range(2)]
    soft = lm(x, FixedRouting(one_hot), mode="soft")
    hard = lm(x, FixedRouting(one_hot), mode="hard")
    torch.testing.assert_close(hard.logits, soft.logits, rtol=1e-9, atol=1e-9)
    assert torch.equal(hard.routing[0].expert_index, one_hot[0].argmax(-1))


def test_particles_broadcast_through_the_lm():
    lm = TinyLM(CFG)
    x = torch.randint(0, 20, (2, 11))
    weights = [torch.softmax(torch.randn(5, 2, 11, 3), -1) for _ in range(2)]
    out = lm(x, FixedRouting(weights)).logits
    assert out.shape == (5, 2, 11, 20)
    torch.testing.assert_close(out[3], lm(x, FixedRouting([w[3] for w in weights])).logits)


def test_tied_head():
    lm = TinyLM(CFG)
    assert lm.head.weight is lm.token_embedding.weight
    untied = TinyLM(TinyLMConfig(**{**CFG.to_dict(), "tie_weights": False}))
    assert untied.head.weight is not untied.token_embedding.weight


@pytest.mark.parametrize("x,error,match", [
    (torch.zeros(2, 5), TypeError, "integer"),
    (torch.zeros(5, dtype=torch.long), ValueError, r"shape \(B, T\)"),
    (torch.full((1, 5), 20), ValueError, "outside"),
    (torch.zeros(1, 30, dtype=torch.long), ValueError, "max_seq_len"),
])
def test_bad_tokens(x, error, match):
    lm = TinyLM(CFG)
    with pytest.raises(error, match=match):
        lm(x, SoftmaxRouting(lm.feature_dim))
