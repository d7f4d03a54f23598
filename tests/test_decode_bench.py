"""Smoke test of the decoding benchmark at toy size, and checks of what it compares with."""

import json
import math

import pytest
import torch

from bayes_router.bench.baselines import PlainCausalLM
from bayes_router.bench.decode import (
    DECODE_MIXES,
    MixRouter,
    PlainKVDecoder,
    decode_table,
    decode_targets,
    filled_cache,
    rewind,
    run_decode_benchmark,
    whole_step_projection,
)
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.tinylm import TinyLM

TOY = dict(contexts=(16, 48), batches=(1, 3), repeats=1, steps=2, warmup=0, prefill_len=32,
           model={"d_model": 16, "n_heads": 2, "window": 4, "chunk_size": 8, "vocab_size": 20},
           progress=False, copy_bytes=1 << 16)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    return out, run_decode_benchmark(out, **TOY)


def test_writes_json_report_and_figure(toy_run):
    out, results = toy_run
    assert json.loads((out / "decode.json").read_text())["steps"] == results["steps"]
    assert (out / "decode.png").stat().st_size > 0
    assert "![decoding](decode.png)" in (out / "decode.md").read_text()
    assert "plain KV cache" in decode_table(results)


def test_every_variant_at_every_context_and_batch(toy_run):
    _, results = toy_run
    variants = {r["variant"] for r in results["steps"]}
    assert len(variants) == len(DECODE_MIXES) + 2  # the mixes, the gated run, the peer
    for batch in (1, 3):
        for t in (16, 48):
            rows = [r for r in results["steps"] if (r["batch"], r["context"]) == (batch, t)]
            assert len(rows) == len(variants)
            for r in rows:
                assert 0 < r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
                assert r["tokens_per_s"] == pytest.approx(batch / r["step_ms"] * 1e3)
    assert all(v["median"] > 0 for v in results["copy_gb_s"].values())
    assert results["prefill"]["ratio"] > 0


def test_targets_not_measured_at_toy_size_say_so(toy_run):
    _, results = toy_run
    targets = {t["name"]: t for t in decode_targets(results)}
    assert targets["D1_local_constant_B1"]["value"] > 0  # 48 / 16, measured
    assert targets["D2_projection_B1"]["passed"] is None  # no context 8192
    assert targets["D5_prefill"]["passed"] is None  # not 4096 tokens


def test_the_projection_in_closed_form():
    cfg = TinyLMConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=1, window=3,
                       max_seq_len=64, controller_hidden=4, mlp_ratio=4)
    t, D, d = 20, 8, 4
    router = 2 * (D + 2) * 4 + 2 * 4 * 3
    fixed = (8 + 16) * D * D + router + 2 * D * (d + 1) + 2 * D * 10
    full, linear, local = 4 * D * (t + 1), 2 * D * (d + 1), 4 * D * 4
    assert whole_step_projection(cfg, (1, 0, 0), t) == pytest.approx(1.0)
    expected = (fixed + 0.5 * linear + 0.5 * local) / (fixed + full)
    assert whole_step_projection(cfg, (0, 0.5, 0.5), t) == pytest.approx(expected)


def test_the_peer_decodes_what_its_forward_pass_computes():
    cfg = TinyLMConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=2, max_seq_len=12,
                       window=4)
    model = PlainCausalLM(cfg).eval()
    x = torch.randint(0, 20, (2, 12))
    decoder = PlainKVDecoder(model, cfg, 2, 12, torch.Generator().manual_seed(0))
    decoder.length = 0
    with torch.no_grad():
        steps = torch.cat([decoder.step(x[:, i:i + 1]) for i in range(12)], 1)
        torch.testing.assert_close(steps, model(x), rtol=1e-5, atol=1e-5)


def test_mix_router_draws_the_shares():
    router = MixRouter((0.2, 0.5, 0.3), seed=0)
    weights = router(0, torch.zeros(40, 100, 5)).weights
    router.reset()
    assert torch.equal(router(0, torch.zeros(40, 100, 5)).weights, weights)  # the same draws
    share = weights.reshape(-1, 3).mean(0)
    n = 4000
    for s, p in zip(share.tolist(), (0.2, 0.5, 0.3), strict=True):
        assert abs(s - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_filled_cache_and_rewind():
    cfg = TinyLMConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=2, max_seq_len=40,
                       window=4)
    lm = TinyLM(cfg).eval()
    cache = filled_cache(lm, 2, 30, 34, torch.Generator().manual_seed(0))
    with torch.no_grad():
        lm(torch.zeros(2, 1, dtype=torch.long), MixRouter((1, 0, 0)),
           mode="hard", cache=cache)
    assert cache.lengths.tolist() == [31, 31]
    rewind(cache, 30)
    assert cache.lengths.tolist() == [30, 30]
    assert all(s.lengths.tolist() == [30, 30] for layer in cache.layers for s in layer.states)


@pytest.mark.parametrize("bad", [dict(contexts=()), dict(batches=(0,)), dict(repeats=0),
                                 dict(steps=0), dict(mixes=((0.5, 0.5),)),
                                 dict(prefill_len=0)])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        run_decode_benchmark(tmp_path, **{**TOY, **bad})


def test_the_command_decodes_a_model_of_the_asked_width_and_window(tmp_path, capsys):
    """`bench --decode-d-model 16 --decode-window 4` times that model, not the default one."""
    from bayes_router.cli import main

    code = main(["bench", "--out", str(tmp_path / "b"), "--decode-only", "--decode-contexts",
                 "16", "--decode-batches", "1", "--decode-steps", "1", "--repeats", "1",
                 "--decode-d-model", "16", "--decode-window", "4"])
    assert code == 0, capsys.readouterr().err
    model = json.loads((tmp_path / "b" / "decode.json").read_text())["config"]["model"]
    assert (model["d_model"], model["window"]) == (16, 4)
