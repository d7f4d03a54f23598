"""Phase-1 comparison: the statistics, the claim verdicts and a toy-size end-to-end run."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from bayes_router.experiments.phase1 import (
    claims,
    decode_axis_label,
    mean_ci,
    power_check,
    run_name,
    run_phase1,
)
from bayes_router.inference.timing import DECODE_STEPS
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.config import TinyLMConfig


def test_mean_ci_is_the_student_t_interval():
    values = [1.0, 2.0, 4.0]
    ci = mean_ci(values)
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert ci["mean"] == pytest.approx(7 / 3)
    assert (ci["low"], ci["high"]) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    single = mean_ci([5.0])
    assert single["mean"] == 5.0 and math.isnan(single["low"])


def _table(bayes, free):
    return {key: {"bayesian": {"per_seed": bayes}, "prior-free": {"per_seed": free}}
            for key in ("projected_flop_cost", "routing_entropy", "val_nll_soft",
                        "val_nll_hard")}


@pytest.mark.parametrize("bayes,free,verdict", [
    ([10.0, 11.0, 12.0], [50.0, 52.0, 51.0], "held"),
    ([10.0, 60.0, 12.0], [50.0, 20.0, 51.0], "direction only"),
    ([60.0, 61.0, 62.0], [50.0, 52.0, 51.0], "did not hold"),
])
def test_claim_verdicts(bayes, free, verdict):
    result = {c["claim"]: c for c in claims(_table(bayes, free), nll_margin_nats=0.05)}
    assert result["projected_flop_cost"]["verdict"] == verdict
    diff = np.subtract(bayes, free)
    assert result["projected_flop_cost"]["difference"]["mean"] == pytest.approx(diff.mean())


def test_non_inferiority_uses_the_upper_bound():
    same = claims(_table([2.0, 2.01, 1.99], [2.0, 2.0, 2.0]), nll_margin_nats=0.05)
    worse = claims(_table([2.3, 2.31, 2.29], [2.0, 2.0, 2.0]), nll_margin_nats=0.05)
    assert {c["claim"]: c["verdict"] for c in same}["val_nll_soft"] == "held"
    assert {c["claim"]: c["verdict"] for c in worse}["val_nll_soft"] == "did not hold"


def _nll_table(per_router: dict) -> dict:
    return {"val_nll_soft": {r: {"per_seed": v, **mean_ci(v)} for r, v in per_router.items()}}


def test_power_check_on_a_case_built_to_pass():
    table = _nll_table({"fixed:full": [1.70, 1.71, 1.69], "fixed:linear": [1.87, 1.86, 1.88],
                        "fixed:local": [1.71, 1.72, 1.70], "bayesian": [1.80, 1.81, 1.79]})
    power = power_check(table, margin_nats=0.035)
    assert power["powered"] and power["reason"].startswith("powered")
    assert (power["best"], power["worst"]) == ("fixed:full", "fixed:linear")
    assert power["gap"]["mean"] == pytest.approx(0.17)
    assert power["spread"] == pytest.approx(0.01)
    assert power["gap_over_spread"] == pytest.approx(17.0)


@pytest.mark.parametrize("per_router, why", [
    # the experts differ by less than the margin (today's 300-step stdlib demo)
    ({"fixed:full": [2.509, 2.52, 2.50], "fixed:linear": [2.555, 2.56, 2.55],
      "fixed:local": [2.510, 2.51, 2.52]}, "underpowered"),
    # a large gap drowned in seed noise
    ({"fixed:full": [1.5, 1.9, 1.6], "fixed:linear": [1.9, 1.6, 2.1]}, "underpowered"),
    # one seed: no spread to compare with
    ({"fixed:full": [1.5], "fixed:linear": [2.5]}, "single seed"),
    # one baseline only
    ({"fixed:full": [1.5, 1.6], "bayesian": [1.7, 1.8]}, "at least two"),
])
def test_power_check_on_cases_built_to_fail(per_router, why):
    power = power_check(_nll_table(per_router), margin_nats=0.05)
    assert not power["powered"] and power["reason"].startswith("underpowered")
    assert why in power["reason"]


def test_intervals_never_leave_the_metrics_range():
    from bayes_router.experiments.phase1 import bounded_ci

    wide = bounded_ci([20.0, 90.0], 0.0, 100.0)  # 2 seeds: t = 12.7
    assert wide["clipped"] and (wide["low"], wide["high"]) == (0.0, 100.0)
    assert wide["mean"] == pytest.approx(55.0)
    tight = bounded_ci([50.0, 51.0, 52.0], 0.0, 100.0)
    assert not tight["clipped"] and tight["low"] > 0


def test_a_claim_on_missing_data_has_no_verdict():
    table = _table([10.0, math.nan, 12.0], [50.0, 52.0, 51.0])
    result = {c["claim"]: c["verdict"] for c in claims(table, nll_margin_nats=0.05)}
    assert result["projected_flop_cost"] == "no verdict (missing data)"


def test_run_names_are_folder_safe():
    assert run_name("fixed:0.2,0.5,0.3", 1) == "fixed-0.2_0.5_0.3-seed1"
    assert run_name("bayesian", 0) == "bayesian-seed0"


def test_toy_phase1_end_to_end(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcabcabd, the cat sat on the mat. " * 80)
    model_cfg = TinyLMConfig(vocab_size=98, d_model=16, n_heads=2, n_layers=2, max_seq_len=32,
                             window=4, chunk_size=8, controller_hidden=8, cost_preset="seed")
    train_cfg = TrainConfig(steps=3, batch_size=4, seq_len=32, eval_every=3, eval_batches=1,
                            checkpoint_every=3, dataset=str(corpus), dataset_max_chars=None)
    result = run_phase1(tmp_path / "p1", seeds=2, model_cfg=model_cfg, train_cfg=train_cfg,
                        progress=False, report=False)
    saved = json.loads((tmp_path / "p1" / "phase1.json").read_text())
    assert saved["seeds"] == 2 and len(saved["claims"]) == 4
    assert saved["routers"] == ["bayesian", "prior-free", "fixed:full", "fixed:linear",
                                "fixed:local"]
    assert "power" in saved and (tmp_path / "p1" / "quality_vs_compute.png").exists()
    # 3 steps: the experts cannot differ beyond the margin, so no verdict is read
    assert not saved["power"]["powered"]
    assert {c["verdict"] for c in result["claims"]} == {"underpowered"}
    assert all(c["verdict_if_powered"] in {"held", "direction only", "did not hold"}
               for c in result["claims"])
    assert "Power check: underpowered" in (tmp_path / "p1" / "phase1.md").read_text()
    assert (tmp_path / "p1" / "fixed-full-seed1" / "metrics.json").exists()
    per_seed = result["table"]["projected_flop_cost"]["bayesian"]["per_seed"]
    run_metrics = [json.loads((tmp_path / "p1" / f"bayesian-seed{s}" / "metrics.json")
                              .read_text())["soft"]["projected_flop_cost"] for s in range(2)]
    assert per_seed == pytest.approx(run_metrics)
    report = (tmp_path / "p1" / "phase1.md").read_text()
    assert "| projected FLOP cost (%)" in report
    # each layer's KL beside its ELBO-surgery parts; routers without a guide spend none
    for layer in (0, 1):
        assert f"| val KL layer {layer} (nats/token) |" in report
        assert f"|   of which I(x; alpha) layer {layer} (nats/token) |" in report
        kl = result["table"][f"val_kl_layer{layer}"]["bayesian"]["per_seed"]
        parts = [result["table"][f"val_{name}_layer{layer}"]["bayesian"]["per_seed"]
                 for name in ("information", "marginal_kl")]
        assert np.add(*parts) == pytest.approx(kl, abs=1e-12) and min(kl) > 0
        assert result["table"][f"val_information_layer{layer}"]["fixed:full"]["mean"] == 0
    # the decoding step beside the prefill, at the longest context max_seq_len = 32 leaves
    for router in saved["routers"]:
        assert result["table"]["hard_time_ratio"][router]["mean"] > 0
        decode = result["table"]["hard_decode_time_ratio"][router]
        assert len(decode["per_seed"]) == 2 and min(decode["per_seed"]) > 0
    assert saved["decode"]["context"] == [32 - DECODE_STEPS]
    assert saved["decode"]["reference"] == ["full"]
    assert "| hard decode step / full-only |" in report
    assert f"from a cache of {32 - DECODE_STEPS} validation tokens" in report
    assert decode_axis_label(saved).endswith(f"context {32 - DECODE_STEPS}")
    # a second call reuses the finished runs
    mtime = (tmp_path / "p1" / "bayesian-seed0" / "metrics.json").stat().st_mtime
    run_phase1(tmp_path / "p1", seeds=2, model_cfg=model_cfg, train_cfg=train_cfg,
               progress=False, report=False)
    assert (tmp_path / "p1" / "bayesian-seed0" / "metrics.json").stat().st_mtime == mtime

    import dataclasses

    with pytest.raises(ValueError, match="another configuration"):
        run_phase1(tmp_path / "p1", seeds=2, model_cfg=model_cfg,
                   train_cfg=dataclasses.replace(train_cfg, lr=0.5), progress=False,
                   report=False)
