"""Rotary positions: the rotation against its closed form, scores that depend only on relative
positions, the position feature, and decoding past the training length."""

import math

import pytest
import torch

from bayes_router.models import BayesianRoutedLM, StaticRoutedLM, TinyLMConfig
from bayes_router.models.controller import controller_features, feature_position
from bayes_router.models.rotary import apply_rotary, rotary_angles


def test_rotation_matches_its_closed_form():
    """Dimension i and i + d/2 of a head rotate as a complex number by t * base^(-2i/d)."""
    d, t = 6, 7
    x = torch.randn(1, 1, 1, d, dtype=torch.float64)
    cos, sin = rotary_angles(torch.tensor([t]), d, torch.float64)
    out = apply_rotary(x, cos, sin)[0, 0, 0]
    for i in range(d // 2):
        angle = t * 10000.0 ** (-2 * i / d)
        z = complex(x[0, 0, 0, i], x[0, 0, 0, i + d // 2]) * complex(math.cos(angle),
                                                                    math.sin(angle))
        assert out[i].item() == pytest.approx(z.real, abs=1e-12)
        assert out[i + d // 2].item() == pytest.approx(z.imag, abs=1e-12)


def test_scores_depend_on_relative_positions_only():
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64)
    def score(m, n):
        qm = apply_rotary(q, *rotary_angles(torch.tensor([m]), 8, torch.float64))
        kn = apply_rotary(k, *rotary_angles(torch.tensor([n]), 8, torch.float64))
        return float((qm * kn).sum())
    assert score(5, 2) == pytest.approx(score(1005, 1002), rel=1e-9)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_rotary_needs_an_even_head_dimension():
    with pytest.raises(ValueError, match="even head dimension"):
        TinyLMConfig(d_model=12, n_heads=4, positions="rotary")
    with pytest.raises(ValueError, match="positions must be one of"):
        TinyLMConfig(positions="alibi")


@pytest.mark.parametrize("scheme", ["learned", "rotary"])
def test_position_feature_inverts_to_the_position(scheme):
    positions = torch.tensor([[0, 1, 127, 128, 5000, 16383, 100_000]])
    if scheme == "learned":
        positions = positions.clamp(max=127)
    h = torch.randn(1, positions.shape[1], 4)
    features = controller_features(h, 128, positions, scheme)
    assert torch.equal(feature_position(features[..., -1], 128, scheme), positions)
    if scheme == "rotary":  # 1 at the last training position, slowly past it
        assert features[0, 2, -1].item() == pytest.approx(1.0, abs=1e-6)
        assert 1 < features[0, 5, -1].item() < 2.1


def _decoded(model, x, mode, prompt):
    """Logits of ``x`` under ``mode``: the whole-sequence pass, and a prefill of ``prompt``
    tokens followed by one decoding step per token."""
    with torch.no_grad():
        ref = model.predict(x, mode).logits
        cache = model.lm.new_cache(x.shape[0], capacity=x.shape[1])
        out = [model.predict(x[:, :prompt], mode, cache=cache).logits]
        out += [model.predict(x[:, t:t + 1], mode, cache=cache).logits
                for t in range(prompt, x.shape[1])]
    return torch.cat(out, 1), ref


def _model(kind, **overrides):
    cfg = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_seq_len=24,
                       window=3, chunk_size=4, positions="rotary", **overrides)
    model = BayesianRoutedLM(cfg) if kind == "bayesian" else StaticRoutedLM(cfg, kind, seed=1)
    for controller in model.controllers:
        torch.nn.init.normal_(controller.net[-1].weight, std=3.0)
    return model.double().eval()


@pytest.mark.parametrize("kind", ["bayesian", "soft:0.2,0.5,0.3", "fixed:local",
                                  "fixed:0.3,0.4,0.3"])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_rotary_decoding_equals_the_forward_pass_past_the_training_length(kind, mode):
    """A model trained at max_seq_len 24 reads 60 tokens: the whole-sequence pass and the
    decoder agree, token for token."""
    model = _model(kind)
    out, ref = _decoded(model, torch.randint(0, 11, (2, 60)), mode, 10)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_separate_projections_rotate_too():
    model = _model("bayesian", shared_qkv=False)
    out, ref = _decoded(model, torch.randint(0, 11, (2, 30)), "hard", 4)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_a_rotary_model_has_no_position_table():
    model = _model("fixed:full")
    assert model.lm.position_embedding is None
    assert not any("position_embedding" in k for k in model.state_dict())


def test_static_hard_shares_repeat_their_assignment_past_the_training_length():
    """Position p takes the assignment of p mod max_seq_len: the shares stay exact over every
    whole period, and the whole pass equals its periodic continuation."""
    model = _model("fixed:0.25,0.5,0.25")
    x = torch.randint(0, 11, (1, 72))
    with torch.no_grad():
        routing = model.predict(x, "hard").routing
    for layer in routing:
        index = layer.expert_index[0]  # (72,)
        assert torch.equal(index[24:48], index[:24]) and torch.equal(index[48:], index[:24])
        assert torch.equal(torch.bincount(index[:24], minlength=3), torch.tensor([6, 12, 6]))


def test_learned_positions_still_cap_the_context():
    cfg = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, max_seq_len=24, window=3)
    model = BayesianRoutedLM(cfg)
    with pytest.raises(ValueError, match="capacity must be an integer in"):
        model.lm.new_cache(1, capacity=25)
    with pytest.raises(ValueError, match="T=25 > max_seq_len=24"):
        model.predict(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rotary_under_autocast_trains_and_decodes(dtype):
    """The LN output stays float32 under autocast while q and k come out of the projection in
    the compute dtype: the rotation must keep theirs."""
    cfg = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, max_seq_len=24,
                       window=3, chunk_size=4, positions="rotary")
    model = BayesianRoutedLM(cfg).eval()
    model.set_precision(dtype)
    out, ref = _decoded(model, torch.randint(0, 11, (2, 30)), "hard", 10)
    assert bool(torch.isfinite(ref).all())
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
