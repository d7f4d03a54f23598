"""Generation: the cached decoder against its naive twin, reproducible sampling, the gates,
and clear errors for bad input."""

import math

import pytest
import torch

from bayes_router.inference.decoding import (
    DecodeConfig,
    generate,
    prompt_batch,
    sample_next,
)
from bayes_router.models import BayesianRoutedLM, PriorFreeRoutedLM, TinyLMConfig

V = 13


def _model(kind="bayesian", max_seq_len=48):
    cfg = TinyLMConfig(vocab_size=V, d_model=16, n_heads=2, n_layers=2, max_seq_len=max_seq_len,
                       window=3, chunk_size=4)
    model = (BayesianRoutedLM if kind == "bayesian" else PriorFreeRoutedLM)(cfg)
    for controller in model.controllers:
        torch.nn.init.normal_(controller.net[-1].weight, std=3.0)
    return model.double()


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]


@pytest.mark.parametrize("routing,threshold,measure", [
    ("soft", None, "total"), ("hard", None, "total"), ("gated", "median", "total"),
    ("gated", "median", "epistemic")])
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, 3)])
def test_cached_generation_equals_the_naive_twin(routing, threshold, measure, temperature,
                                                 top_k):
    model = _model()
    if threshold == "median":  # half the prompts' decisions each way
        with torch.no_grad():
            out = model.predict(torch.tensor([PROMPTS[2]]), "gated", 1.0, measure)
        threshold = float(torch.cat([r.decision.uncertainty.flatten()
                                     for r in out.routing]).median())
    config = DecodeConfig(max_new_tokens=9, routing=routing, gate_threshold=threshold,
                          gate_measure=measure, temperature=temperature, top_k=top_k, seed=4)
    fast = generate(model, PROMPTS, config)
    slow = generate(model, PROMPTS, config, naive=True)
    assert torch.equal(fast.tokens, slow.tokens)
    assert torch.equal(fast.experts, slow.experts)
    torch.testing.assert_close(fast.uncertainty, slow.uncertainty, equal_nan=True)
    if routing == "gated":  # the gate sends some decisions each way
        assert bool((fast.experts == -1).any()) and bool((fast.experts >= 0).any())
    assert fast.new_tokens.shape == (3, 9)
    assert fast.step_seconds.shape == (8,)
    for b, p in enumerate(PROMPTS):  # the prompt first, then the new tokens, then padding
        assert fast.tokens[b, :len(p)].tolist() == p
        assert bool((fast.tokens[b, len(p):len(p) + 9] >= 0).all())
        assert bool((fast.tokens[b, len(p) + 9:] == -1).all())
        # every token read but the last sampled one, and nothing past it
        read = fast.experts[:, b] > -2
        assert read[:, :len(p) + 8].all() and not read[:, len(p) + 8:].any()


def test_sampling_is_reproducible_from_the_seed():
    model = _model("prior-free")
    config = DecodeConfig(max_new_tokens=20, routing="hard", temperature=1.0, seed=11)
    a, b = generate(model, PROMPTS, config), generate(model, PROMPTS, config)
    assert torch.equal(a.tokens, b.tokens)
    other = generate(model, PROMPTS, DecodeConfig(max_new_tokens=20, routing="hard", seed=12))
    assert not torch.equal(a.tokens, other.tokens)


def test_sample_next_greedy_and_top_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).expand(4000, 4)
    assert sample_next(logits, 0.0, None, g).eq(1).all()
    draws = sample_next(logits, 1.0, 2, g)
    assert set(draws.tolist()) == {1, 3}  # only the two largest
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(4000, 4)
    assert len(set(sample_next(tied, 1.0, 2, g).tolist())) == 2  # exactly k, ties too
    assert sample_next(logits, 1e-310, None, g).eq(1).all()  # a tiny temperature: greedy
    # the frequencies of a plain draw follow the softmax (4000 draws: 4 sigma)
    draws = sample_next(logits, 2.0, None, g)
    probs = (logits[0] / 2).softmax(-1)
    freq = torch.bincount(draws, minlength=4) / 4000
    assert bool(((freq - probs).abs() <= 4 * (probs * (1 - probs) / 4000).sqrt()).all())


def test_the_random_gate_sends_the_asked_fraction_soft():
    model = _model()
    config = DecodeConfig(max_new_tokens=40, routing="gated", gate_threshold=0.7,
                          gate_measure="random", seed=2)
    out = generate(model, [[1, 2]] * 4, config)
    read = out.experts > -2
    soft = float((out.experts[read] == -1).float().mean())
    n = int(read.sum())
    assert abs(soft - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    assert out.soft_fraction() == pytest.approx(soft)


def test_cache_bytes_follow_the_experts():
    model = _model()
    out = generate(model, [[1, 2, 3]], DecodeConfig(max_new_tokens=5))
    H, d, L = 2, 8, 2
    full = 2 * H * 7 * d * 8  # keys and values of the 7 positions the cache has room for
    local = 2 * H * 4 * d * 8  # the ring of w + 1 = 4
    linear = H * d * (d + 1) * 8
    lengths = 3 * 8  # the three states' (B,) lengths
    assert out.cache_bytes == L * (full + local + linear + lengths)


@pytest.mark.parametrize("config,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(routing="sparse"), "routing must be one of"),
    (dict(routing="gated"), r"gate_threshold must be a number in \[0, 1\]"),
    (dict(routing="gated", gate_threshold=1.5), r"gate_threshold must be a number in \[0, 1\]"),
    (dict(routing="hard", gate_threshold=0.5), "applies to gated routing only"),
    (dict(gate_measure="mutual"), "gate_measure must be one of"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\^63\)"),
    (dict(seed=2**70), r"seed must be an integer in \[0, 2\^63\)"),
    (dict(routing="hard", gate_measure="epistemic"), "applies to gated routing only"),
])
def test_bad_configs(config, match):
    with pytest.raises(ValueError, match=match):
        DecodeConfig(**config)


def test_bad_prompts_and_contexts():
    model = _model(max_seq_len=16)
    config = DecodeConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="must not be empty"):
        generate(model, [[1], []], config)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate(model, [], config)
    with pytest.raises(ValueError, match=r"outside \[0, 13\)"):
        generate(model, [[1, 13]], config)
    with pytest.raises(ValueError, match="read 17 positions .* it supports 16"):
        generate(model, [list(range(12)) + [1, 2]], DecodeConfig(max_new_tokens=4))
    generate(model, [list(range(13))], DecodeConfig(max_new_tokens=4))  # reads 16: fits
    with pytest.raises(ValueError, match="integer token ids; prompt 0 holds 'a'"):
        generate(model, [["a"]], config)
    with pytest.raises(ValueError, match="integer token ids; prompt 0 holds 1.7"):
        generate(model, [[1.7, 2]], config)
    with pytest.raises(ValueError, match="needs the Bayesian router"):
        generate(_model("prior-free"), [[1]], DecodeConfig(
            max_new_tokens=4, routing="gated", gate_threshold=0.5, gate_measure="epistemic"))


def test_prompt_batch_right_pads():
    batch, lengths = prompt_batch([[3, 4], [5]])
    assert batch.tolist() == [[3, 4], [5, 0]] and lengths.tolist() == [2, 1]
    batch, lengths = prompt_batch(torch.tensor([[1, 2, 3]]))
    assert lengths.tolist() == [3]


def test_a_rotary_model_generates_past_its_training_length():
    cfg = TinyLMConfig(vocab_size=V, d_model=16, n_heads=2, n_layers=2, max_seq_len=24,
                       window=3, chunk_size=4, positions="rotary")
    model = BayesianRoutedLM(cfg).double()
    config = DecodeConfig(max_new_tokens=40, routing="hard", temperature=0.0)
    fast = generate(model, [[1, 2, 3]], config)
    assert torch.equal(fast.tokens, generate(model, [[1, 2, 3]], config, naive=True).tokens)
