"""Teacher-forced decoding equals the whole-sequence forward pass, token for token.

A prompt prefilled through a :class:`DecodeCache`, then continued one token at a time (or in
chunks), must give the logits and the routing of the forward pass over the whole sequence
under the same routing: every router, every mode, every expert, prompts of length 1, shorter
and longer than the window, batches whose sequences route differently, prompts of different
lengths.
"""

import pytest
import torch

from bayes_router.models import (
    BayesianRoutedLM,
    PriorFreeRoutedLM,
    StaticRoutedLM,
    TinyLMConfig,
)

V, WINDOW, MAX_LEN = 11, 3, 40
MODES = [("soft", None), ("hard", None), ("gated", "median")]


def _model(kind, dtype=torch.float64, **overrides):
    cfg = TinyLMConfig(**{**dict(vocab_size=V, d_model=16, n_heads=2, n_layers=2,
                                 max_seq_len=MAX_LEN, window=WINDOW, chunk_size=4), **overrides})
    if kind == "bayesian":
        model = BayesianRoutedLM(cfg)
    elif kind == "prior-free":
        model = PriorFreeRoutedLM(cfg)
    else:
        model = StaticRoutedLM(cfg, kind, seed=3)
    for controller in model.controllers:  # routing that differs from token to token
        torch.nn.init.normal_(controller.net[-1].weight, std=3.0)
    return model.to(dtype).eval()


def _threshold(model, x, threshold):
    """``"median"``: the median routing uncertainty of ``x``'s tokens under ``model``, so that
    gating sends about half of them hard and half soft."""
    if threshold != "median":
        return threshold
    with torch.no_grad():
        out = model.predict(x, "gated", 1.0)
    return float(torch.cat([r.decision.uncertainty.flatten() for r in out.routing]).median())


def _decode(model, x, mode, threshold, chunks):
    """Logits of ``x`` prefilled by its first ``chunks[0]`` tokens, then continued chunk by
    chunk, and the expert index of every token per layer."""
    cache = model.lm.new_cache(x.shape[0])
    logits, experts, start = [], [], 0
    for size in chunks:
        out = model.predict(x[:, start:start + size], mode, threshold, cache=cache)
        logits.append(out.logits)
        experts.append([r.expert_index for r in out.routing])
        start += size
    assert cache.lengths.tolist() == [start] * x.shape[0]
    return torch.cat(logits, 1), experts


def _close(out, ref, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * float(ref.detach().abs().max()))


@pytest.mark.parametrize("kind", ["bayesian", "prior-free", "fixed:0.3,0.4,0.3"])
@pytest.mark.parametrize("mode,threshold", MODES)
@pytest.mark.parametrize("prompt", [1, WINDOW - 1, WINDOW + 2, 12])
def test_token_by_token_decoding_equals_the_forward_pass(kind, mode, threshold, prompt):
    model = _model(kind)
    x = torch.randint(0, V, (3, 20))
    threshold = _threshold(model, x, threshold)
    ref = model.predict(x, mode, threshold)
    with torch.no_grad():
        logits, experts = _decode(model, x, mode, threshold, [prompt] + [1] * (20 - prompt))
    _close(logits, ref.logits, torch.float64)
    if mode != "soft":  # the same routing for the same token
        for layer, routing in enumerate(ref.routing):
            decoded = torch.cat([e[layer] for e in experts], 1)
            assert torch.equal(decoded, routing.expert_index)


@pytest.mark.parametrize("kind", ["bayesian", "prior-free"])
def test_sequences_of_one_batch_route_differently_at_a_step(kind):
    """The property the other tests rely on: decoding steps whose sequences read different
    experts (the grouping by expert), and tokens of both kinds under gating."""
    model = _model(kind)
    x = torch.randint(0, V, (6, 20))
    with torch.no_grad():
        _, experts = _decode(model, x, "hard", None, [4] + [1] * 16)
        _, gated = _decode(model, x, "gated", _threshold(model, x, "median"), [4] + [1] * 16)
    steps = torch.stack([e[0][:, 0] for e in experts[1:]])  # (steps, B) layer 0
    assert any(len(set(row.tolist())) > 1 for row in steps)
    decisions = torch.cat([torch.cat(e[0:1], 1) for e in gated], 1)
    assert bool((decisions == -1).any()) and bool((decisions >= 0).any())


@pytest.mark.parametrize("expert", ["full", "linear", "local"])
@pytest.mark.parametrize("mode,threshold", MODES)
def test_one_expert_models_decode_as_they_forward(expert, mode, threshold):
    model = _model(f"fixed:{expert}")
    x = torch.randint(0, V, (2, 15))
    threshold = _threshold(model, x, threshold)
    with torch.no_grad():
        logits, _ = _decode(model, x, mode, threshold, [5] + [1] * 10)
    _close(logits, model.predict(x, mode, threshold).logits, torch.float64)


@pytest.mark.parametrize("mode,threshold", MODES)
@pytest.mark.parametrize("chunks", [[3, 5, 1, 7], [1, 9, 6]])
def test_a_prompt_prefilled_in_chunks(mode, threshold, chunks):
    model = _model("bayesian")
    x = torch.randint(0, V, (2, sum(chunks)))
    threshold = _threshold(model, x, threshold)
    with torch.no_grad():
        logits, _ = _decode(model, x, mode, threshold, chunks)
    _close(logits, model.predict(x, mode, threshold).logits, torch.float64)


@pytest.mark.parametrize("mode,threshold", MODES)
def test_prompts_of_different_lengths(mode, threshold):
    """Right-padded prompts (lengths 1, 7 and 4): each sequence's logits are those of its own
    whole-sequence pass, whatever the padding holds."""
    model = _model("prior-free")
    lengths, steps = [1, 7, 4], 6
    seqs = [torch.randint(0, V, (n + steps,)) for n in lengths]
    threshold = _threshold(model, torch.stack(seqs[1:2] * 3), threshold)
    prompts = torch.randint(0, V, (3, 7))  # the padding: other tokens
    for b, n in enumerate(lengths):
        prompts[b, :n] = seqs[b][:n]
    cache = model.lm.new_cache(3)
    with torch.no_grad():
        out = model.predict(prompts, mode, threshold, cache=cache, lengths=torch.tensor(lengths))
        first = out.logits[torch.arange(3), torch.tensor(lengths) - 1]
        decoded = [first]
        for s in range(steps):
            token = torch.stack([seqs[b][n + s] for b, n in enumerate(lengths)])[:, None]
            decoded.append(model.predict(token, mode, threshold, cache=cache).logits[:, 0])
    decoded = torch.stack(decoded, 1)  # (B, steps + 1, V)
    for b, n in enumerate(lengths):
        ref = model.predict(seqs[b][None], mode, threshold).logits[0, n - 1:]
        _close(decoded[b], ref, torch.float64)


@pytest.mark.parametrize("mode,threshold", MODES)
def test_float32_within_1e5(mode, threshold):
    model = _model("bayesian", dtype=torch.float32)
    x = torch.randint(0, V, (2, 30))
    threshold = _threshold(model, x, threshold)
    with torch.no_grad():
        logits, _ = _decode(model, x, mode, threshold, [6] + [1] * 24)
        ref = model.predict(x, mode, threshold).logits
    _close(logits, ref, torch.float32)


def test_separate_projections_per_expert():
    model = _model("prior-free", shared_qkv=False)
    x = torch.randint(0, V, (3, 14))
    for mode, threshold in MODES:
        threshold = _threshold(model, x, threshold)
        with torch.no_grad():
            logits, _ = _decode(model, x, mode, threshold, [4] + [1] * 10)
        _close(logits, model.predict(x, mode, threshold).logits, torch.float64)


def test_decoding_past_the_model_or_the_cache_is_refused():
    model = _model("prior-free")
    cache = model.lm.new_cache(1)
    model.predict(torch.zeros(1, MAX_LEN, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="past what the model supports"):
        model.predict(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    small = model.lm.new_cache(1, capacity=5)
    with pytest.raises(ValueError, match="capacity 5"):
        model.predict(torch.zeros(1, 6, dtype=torch.long), cache=small)
    with pytest.raises(ValueError, match="capacity must be an integer in"):
        model.lm.new_cache(1, capacity=MAX_LEN + 1)


def test_cache_misuse_gets_clear_errors():
    model = _model("prior-free")
    cache = model.lm.new_cache(2)
    with pytest.raises(ValueError, match="x has 3 sequences, the cache 2"):
        model.predict(torch.zeros(3, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="lengths must hold one integer prompt length"):
        model.predict(torch.zeros(2, 4, dtype=torch.long), cache=cache,
                      lengths=torch.tensor([0, 4]))
    model.predict(torch.zeros(2, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="prefill only"):
        model.predict(torch.zeros(2, 1, dtype=torch.long), cache=cache,
                      lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="needs a cache"):
        model.predict(torch.zeros(2, 4, dtype=torch.long), lengths=torch.tensor([1, 1]))


def test_a_failed_pass_leaves_the_cache_refusing_further_use():
    """A router that fails at layer 1: layer 0's states took the tokens, so the cache says it
    is half-written instead of silently continuing from the wrong place."""
    model = _model("prior-free")
    cache = model.lm.new_cache(2)

    def failing(layer, features):
        if layer == 1:
            raise RuntimeError("router failed")
        return model.decision(layer, features)

    with pytest.raises(RuntimeError, match="router failed"):
        model.lm(torch.zeros(2, 4, dtype=torch.long), failing, cache=cache)
    with pytest.raises(ValueError, match="half-written"):
        model.predict(torch.zeros(2, 4, dtype=torch.long), cache=cache)


def test_chunks_of_sequences_of_different_lengths_are_refused_before_any_write():
    model = _model("prior-free")
    cache = model.lm.new_cache(2)
    model.predict(torch.zeros(2, 6, dtype=torch.long), cache=cache, lengths=torch.tensor([3, 6]))
    with pytest.raises(ValueError, match="one token at a time"):
        model.predict(torch.zeros(2, 2, dtype=torch.long), cache=cache)
    assert not cache.failed
    assert all(s.lengths.tolist() == [3, 6] for layer in cache.layers for s in layer.states)
    model.predict(torch.zeros(2, 1, dtype=torch.long), cache=cache)  # one token: fine
    assert cache.lengths.tolist() == [4, 7]


def test_a_cache_of_another_model_or_kind_is_refused():
    model = _model("prior-free")
    other = _model("prior-free", n_heads=4)
    with pytest.raises(ValueError, match="made for another model"):
        model.predict(torch.zeros(1, 3, dtype=torch.long), cache=other.lm.new_cache(1))
    with pytest.raises(ValueError, match="cache must be a DecodeCache"):
        model.predict(torch.zeros(1, 3, dtype=torch.long), cache=object())
    with pytest.raises(ValueError, match="one integer prompt length"):
        model.predict(torch.zeros(2, 4, dtype=torch.long), cache=model.lm.new_cache(2),
                      lengths=torch.tensor([2.9, 4.0]))
