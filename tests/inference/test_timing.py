"""Decoding-step timing: the full-only reference, the interleaved step times, their checks."""

import pytest
import torch

from bayes_router.inference.evaluate import timed_decode
from bayes_router.inference.timing import (
    DECODE_STEPS,
    FULL_ONLY,
    decode_step_times,
    full_only_router,
    reference_expert,
)
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.prior_free import PriorFreeRoutedLM

pytestmark = pytest.mark.usefixtures("local_params")

VOCAB = 11


def tiny_config(**overrides) -> TinyLMConfig:
    return TinyLMConfig(**{"vocab_size": VOCAB, "d_model": 16, "n_heads": 2, "n_layers": 2,
                           "max_seq_len": 16, "window": 4, "chunk_size": 4,
                           "controller_hidden": 8, **overrides})


@pytest.fixture(scope="module")
def model():
    return BayesianRoutedLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def test_every_variant_gets_one_positive_time_per_repeat(model, tokens):
    modes = {"hard": ("hard", None), "soft": ("soft", None), "gated": ("gated", 0.5)}
    times = decode_step_times(model, tokens, modes, context=10, steps=3, repeats=4, warmup=0)
    assert set(times) == {*modes, FULL_ONLY}
    assert all(len(t) == 4 and all(s > 0 for s in t) for t in times.values())


def test_the_full_only_router_sends_every_token_to_full(model, tokens):
    full = model.cfg.experts.index("full")
    router = full_only_router(model)
    whole = model.lm(tokens, router, mode="hard")
    cache = model.lm.new_cache(2, capacity=16)
    model.lm(tokens[:, :10], router, mode="hard", cache=cache)
    step = model.lm(tokens[:, 10:11], router, mode="hard", cache=cache)
    for out, length in ((whole, 16), (step, 1)):
        for routing in out.routing:
            assert routing.expert_index.shape == (2, length)
            assert bool((routing.expert_index == full).all())
    # the same logits as the whole-sequence pass at that position (the cache is real)
    torch.testing.assert_close(step.logits[:, 0], whole.logits[:, 10], rtol=1e-4, atol=1e-5)


def test_without_full_the_reference_is_the_most_expensive_expert():
    cfg = tiny_config(experts=("linear", "local"))
    model = PriorFreeRoutedLM(cfg, costs=torch.tensor([0.2, 0.7]))
    assert reference_expert(model) == 1
    x = torch.randint(0, VOCAB, (1, 8))
    for routing in model.lm(x, full_only_router(model), mode="hard").routing:
        assert bool((routing.expert_index == 1).all())
    timing = timed_decode(model, x, steps=2, repeats=1)
    assert timing["decode_reference"] == "local" and timing["decode_time_ratio"] > 0


@pytest.mark.parametrize("context,steps,match", [
    (0, 2, "context must be an integer >= 1"),
    (True, 2, "context must be an integer >= 1"),
    (4, 0, "steps must be an integer >= 1"),
    (4, 1.5, "steps must be an integer >= 1"),
    (12, 5, "must be <= x's length 16"),
])
def test_bad_context_or_steps_are_refused(model, tokens, context, steps, match):
    with pytest.raises(ValueError, match=match):
        decode_step_times(model, tokens, {"hard": ("hard", None)}, context, steps, repeats=1)


def test_decoding_past_the_models_positions_is_refused(model):
    long = torch.randint(0, VOCAB, (1, 24))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        decode_step_times(model, long, {"hard": ("hard", None)}, context=12, steps=5,
                          repeats=1)


@pytest.mark.parametrize("modes,match", [
    ({FULL_ONLY: ("hard", None)}, "label"),
    ({"x": ("sparse", None)}, "mode must be one of"),
])
def test_bad_modes_are_refused(model, tokens, modes, match):
    with pytest.raises(ValueError, match=match):
        decode_step_times(model, tokens, modes, context=4, steps=2, repeats=1)


def test_timed_decode_defaults_to_the_longest_context(model, tokens):
    timing = timed_decode(model, tokens, mode="hard", repeats=2)
    assert timing["decode_context"] == 16 - DECODE_STEPS
    assert timing["decode_steps"] == DECODE_STEPS and timing["decode_batch"] == 2
    assert timing["decode_reference"] == "full"
    assert timing["decode_step_ms"] > 0 and timing["decode_full_only_step_ms"] > 0
    assert timing["decode_time_ratio"] == pytest.approx(
        timing["decode_step_ms"] / timing["decode_full_only_step_ms"])
    with pytest.raises(ValueError, match="too few"):
        timed_decode(model, tokens[:, :DECODE_STEPS], repeats=1)

