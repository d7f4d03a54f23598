"""Smoke test of the speed benchmark at toy size (the real run is benchmarks/bench_experts.py)."""

import json
import math

import pytest
import torch

from bayes_router.bench import EXPERTS, BenchConfig, format_table, one_hot_mix, run_benchmark
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.experts import cost_vector

TOY = dict(seq_lens=(16, 32), d_model=32, n_heads=2, window=4, hard_seq_len=32, repeats=1,
           warmup=0, matmul_size=256, flex=False, memory=False,
           svi_configs=({"vocab_size": 20, "d_model": 16, "n_heads": 2, "n_layers": 1,
                         "max_seq_len": 16, "window": 4, "chunk_size": 8, "batch_size": 2},))


def _numbers(obj):
    """Every int/float leaf of a JSON tree (bools excluded)."""
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _numbers(value)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = run_benchmark(out, BenchConfig(**TOY), progress=False)
    return out, results


def test_writes_valid_json_matching_the_results(toy_run):
    out, results = toy_run
    loaded = json.loads((out / "bench.json").read_text())
    assert loaded == json.loads(json.dumps(results))
    for key in ("schema", "environment", "config", "conventions", "matmul", "experts", "naive",
                "hard_layer", "targets", "all_targets_passed"):
        assert key in loaded
    for key in ("torch", "num_threads", "platform", "processor"):
        assert loaded["environment"][key]
    assert loaded["config"]["seq_lens"] == [16, 32]
    assert "3 x fwd_flops" in loaded["conventions"]["fwd_bwd_flops"]
    step = loaded["svi_step"][0]
    assert step["ratio"] == pytest.approx(step["bayesian_s"] / step["prior_free_s"])
    assert step["full_only_over_plain"] == pytest.approx(
        step["prior_free_full_only_s"] / step["plain_s"])
    assert any(t["name"] == "svi_step_ratio_0" for t in loaded["targets"])
    assert "SVI step" in format_table(results)
    assert "the full expert alone" in format_table(results)


def test_writes_a_report_and_a_figure(toy_run):
    out, results = toy_run
    report = (out / "report.md").read_text()
    assert "![benchmark](bench.png)" in report and format_table(results) in report
    assert (out / "bench.png").stat().st_size > 0 and results["figure"] == "bench.png"


def test_the_hard_layer_defaults_to_the_longest_requested_length(tmp_path):
    """--seq-lens 16 times nothing longer: the hard layer runs at 16, no SVI step asked."""
    config = BenchConfig(**{**TOY, "seq_lens": (16,), "hard_seq_len": None, "svi_configs": ()})
    results = run_benchmark(tmp_path, config, progress=False)
    assert results["hard_layer"]["seq_len"] == 16 and results["svi_step"] == []
    assert {r["seq_len"] for r in results["experts"]} == {16}


def test_expert_rows_cover_every_expert_and_length(toy_run):
    _, results = toy_run
    rows = {(r["expert"], r["seq_len"]): r for r in results["experts"]}
    assert set(rows) == {(name, t) for name in EXPERTS for t in (16, 32)}
    for r in rows.values():
        assert r["fwd_bwd_flops"] == pytest.approx(3 * r["fwd_flops"])
        assert r["fwd_gflops"] == pytest.approx(r["fwd_flops"] / r["fwd_ms"] / 1e6)
        assert r["fwd_fraction_of_matmul"] == pytest.approx(
            r["fwd_gflops"] / results["matmul"]["gflops"])
    assert {(r["expert"], r["seq_len"]) for r in results["naive"]} == set(rows)


def test_every_number_is_positive_and_finite(toy_run):
    _, results = toy_run
    numbers = list(_numbers({k: v for k, v in results.items() if k != "targets"}))
    assert numbers
    # costs and shares may be 0 (the full-only mix has no linear/local tokens); times may not
    assert all(math.isfinite(x) and x >= 0 for x in numbers)
    timed = [r[key] for section in (results["experts"], results["hard_layer"]["mixes"])
             for r in section for key in r if key.endswith("_ms") or key.endswith("ratio")]
    timed += [results["matmul"]["gflops"], results["hard_layer"]["soft_fwd_ms"]]
    assert timed and all(math.isfinite(x) and x > 0 for x in timed)


def test_hard_layer_reports_both_projected_costs(toy_run):
    _, results = toy_run
    hard = results["hard_layer"]
    assert [m["mix"] for m in hard["mixes"]] == [[1, 0, 0], [0.25, 0.5, 0.25], [0, 1, 0],
                                                 [0.5, 0, 0.5], [0.9, 0.05, 0.05]]
    reference = hard["mixes"][0]
    assert reference["fwd_ratio"] == 1.0
    assert reference["projected_cost_attention_core"] == pytest.approx(1.0)
    assert reference["projected_cost_with_projections"] == pytest.approx(1.0)
    assert set(hard["dense_core_fwd_ms"]) == set(EXPERTS)
    assert all(m["projected_cost_timed"] > 0 for m in hard["mixes"])
    cfg = TinyLMConfig.from_dict(hard["cfg"])
    core_costs = cost_vector(cfg, hard["seq_len"]).tolist()
    for m in hard["mixes"]:
        assert sum(m["realised_shares"]) == pytest.approx(1.0)
        core = sum(s * c for s, c in zip(m["realised_shares"], core_costs))
        assert m["projected_cost_attention_core"] == pytest.approx(core)
        # the projections are paid by every token alike, so they pull the cost toward 1
        assert core <= m["projected_cost_with_projections"] + 1e-6 or core > 1


def test_targets_skip_what_was_not_measured(toy_run):
    _, results = toy_run
    by_name = {t["name"]: t for t in results["targets"]}
    assert by_name["full_fwd_throughput_T2048"]["passed"] is None  # T=2048 not in the toy run
    hard = by_name["hard_layer_fwd_vs_projected_with_projections"]
    assert hard["primary"] and isinstance(hard["passed"], bool)
    assert hard["value"] > 0


def test_format_table_mentions_every_section(toy_run):
    _, results = toy_run
    table = format_table(results)
    for word in ("GFLOP/s", "full", "linear", "local", "Hard-routed layer", "Targets"):
        assert word in table


def test_one_hot_mix_has_exact_counts():
    weights, shares = one_hot_mix(3, 10, (0.25, 0.5, 0.25))
    assert weights.shape == (3, 10, 3)
    assert (weights.sum(-1) == 1).all()
    counts = weights.sum(1)  # (B, K)
    assert (counts == counts[0]).all() and counts[0].sum() == 10
    assert shares == pytest.approx((counts[0] / 10).tolist())


@pytest.mark.parametrize("bad", [dict(mixes=((0.5, 0.5),)), dict(mixes=((0.5, 0.6, 0.0),)),
                                 dict(repeats=0), dict(n_heads=3), dict(seq_lens=())])
def test_bad_arguments_raise_value_error(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        BenchConfig(**{**TOY, **bad})


def test_the_baselines_compute_what_they_claim():
    from bayes_router.bench.baselines import PlainCausalLM, banded_sdpa, peak_memory, plain_step
    from bayes_router.models.experts.naive import naive_local

    q, k, v = (torch.randn(2, 2, 23, 8) for _ in range(3))
    torch.testing.assert_close(banded_sdpa(4, 23)(q, k, v), naive_local(q, k, v, window=4),
                               rtol=1e-5, atol=1e-5)
    cfg = TinyLMConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=2, max_seq_len=16,
                       window=4)
    lm = PlainCausalLM(cfg)
    x = torch.randint(0, 20, (3, 16))
    x2 = x.clone()
    x2[:, 9:] = (x2[:, 9:] + 1) % 20
    assert torch.allclose(lm(x)[:, :9], lm(x2)[:, :9], atol=1e-6)  # causal
    step = plain_step(cfg, x, x.roll(-1, 1), lr=1e-2)
    losses = [step() for _ in range(30)]
    assert losses[-1] < losses[0]  # it trains
    memory = peak_memory("plain", {k: v for k, v in cfg.to_dict().items()}, batch_size=2, steps=1)
    assert memory["peak_rss_mb"] >= memory["import_rss_mb"] > 0
    assert memory["training_mb"] > 0  # the training's own peak, not the imports'
    bigger = peak_memory("plain", {**cfg.to_dict(), "d_model": 128, "max_seq_len": 256,
                                   "vocab_size": 2000}, batch_size=16, steps=1)
    assert bigger["training_mb"] > memory["training_mb"]  # it measures what it claims


def test_the_step_and_memory_targets_are_checked():
    from bayes_router.bench.targets import check_targets

    results = {"experts": [], "hard_layer": {"mixes": []},
               "local_baselines": {"seq_len": 2048, "flex_over_local": 0.8},
               "svi_step": [{"config": {"d_model": 64, "n_layers": 2}, "seq_len": 128,
                             "batch_size": 16, "ratio": 1.1, "prior_free_over_plain": 1.7,
                             "prior_free_memory_over_plain": 1.2}]}
    passed = {t["name"]: t["passed"] for t in check_targets(results)}
    assert passed["local_vs_flex_T2048"] is False and passed["svi_step_ratio_0"] is True
    assert passed["prior_free_over_plain_0"] is False
    assert passed["prior_free_memory_over_plain_0"] is True


def test_the_short_length_hard_layer_rows_and_target(tmp_path):
    config = BenchConfig(**{**TOY, "seq_lens": (16, 128), "hard_seq_len": None,
                            "svi_configs": ()})
    results = run_benchmark(tmp_path, config, progress=False)
    rows = results["hard_layer_short"]
    assert {r["seq_len"] for r in rows} == {128} and len(rows) == 5  # the five default mixes
    for r in rows:
        assert r["fwd_ratio"] == pytest.approx(r["fwd_ms"] / r["full_only_fwd_ms"])
    target = next(t for t in results["targets"] if t["name"] == "hard_layer_short_worst")
    assert target["value"] == max(r["fwd_ratio"] for r in rows)
    assert "Hard-routed layer at short lengths" in format_table(results)


def test_the_local_scaling_target_reads_one_round_robin(tmp_path, monkeypatch):
    """Where the run has both lengths of the scaling target, they are timed together and the
    target reads that ratio, not the ratio of two separately timed expert rows."""
    import bayes_router.bench.harness as harness
    import bayes_router.bench.targets as targets

    monkeypatch.setattr(harness, "SCALING_SEQ_LENS", (16, 32))
    monkeypatch.setattr(targets, "SCALING_SEQ_LENS", (16, 32))
    results = run_benchmark(tmp_path, BenchConfig(**{**TOY, "svi_configs": ()}), progress=False)
    scaling = results["local_scaling"]
    assert scaling["seq_lens"] == [16, 32]
    assert scaling["ratio"] == pytest.approx(scaling["fwd_ms"][1] / scaling["fwd_ms"][0])
    target = next(t for t in results["targets"] if t["name"] == "local_fwd_scaling_T16_to_T32")
    assert target["value"] == scaling["ratio"] and "one round-robin" in target["description"]
    assert "in one round-robin" in format_table(results)
    assert json.loads((tmp_path / "bench.json").read_text())["local_scaling"] == scaling


def test_the_local_scaling_target_falls_back_to_the_expert_rows():
    from bayes_router.bench.targets import check_targets

    rows = [{"expert": "local", "seq_len": 2048, "fwd_ms": 10.0, "fwd_fraction_of_matmul": 0.2},
            {"expert": "local", "seq_len": 4096, "fwd_ms": 30.0}]
    results = {"experts": rows, "hard_layer": {"mixes": []}}
    target = next(t for t in check_targets(results) if t["name"].startswith("local_fwd_scaling"))
    assert target["value"] == 3.0 and target["passed"] is False
    results["local_scaling"] = {"seq_lens": [2048, 4096], "fwd_ms": [10.0, 20.0], "ratio": 2.0}
    target = next(t for t in check_targets(results) if t["name"].startswith("local_fwd_scaling"))
    assert target["value"] == 2.0 and target["passed"] is True


def test_the_step_floor_runs_the_routed_lm_with_the_full_expert_alone(monkeypatch):
    """``prior_free_step(..., ("full",))`` trains a prior-free LM whose layers hold only the
    full expert (the routed step's floor: router, mixing, Pyro), and its loss goes down."""
    from bayes_router.bench import baselines

    built, real = [], baselines.PriorFreeRoutedLM

    def recording(cfg):
        built.append(real(cfg))
        return built[-1]

    monkeypatch.setattr(baselines, "PriorFreeRoutedLM", recording)
    cfg = TinyLMConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1, max_seq_len=6,
                       window=2, chunk_size=2)
    torch.manual_seed(0)
    x, y = torch.randint(0, 11, (3, 6)), torch.randint(0, 11, (3, 6))
    step = baselines.prior_free_step(cfg, x, y, ("full",), lr=1e-2)
    (model,) = built
    assert [e.name for e in model.lm.blocks[0].attn.experts] == ["full"]
    losses = [step() for _ in range(5)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
