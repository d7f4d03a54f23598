"""Phase-1 comparison: the statistics, the claim verdicts and a toy-size end-to-end run."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from bayes_router.experiments.phase1 import claims, mean_ci, run_phase1
from bayes_router.inference.train import TrainConfig
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
    assert {c["verdict"] for c in result["claims"]} <= {"held", "direction only",
                                                        "did not hold"}
    per_seed = result["table"]["projected_flop_cost"]["bayesian"]["per_seed"]
    run_metrics = [json.loads((tmp_path / "p1" / f"bayesian-seed{s}" / "metrics.json")
                              .read_text())["soft"]["projected_flop_cost"] for s in range(2)]
    assert per_seed == pytest.approx(run_metrics)
    assert "| projected FLOP cost (%)" in (tmp_path / "p1" / "phase1.md").read_text()
    # a second call reuses the finished runs
    mtime = (tmp_path / "p1" / "bayesian-seed0" / "metrics.json").stat().st_mtime
    run_phase1(tmp_path / "p1", seeds=2, model_cfg=model_cfg, train_cfg=train_cfg,
               progress=False, report=False)
    assert (tmp_path / "p1" / "bayesian-seed0" / "metrics.json").stat().st_mtime == mtime

    import dataclasses

    with pytest.raises(ValueError, match="different configuration"):
        run_phase1(tmp_path / "p1", seeds=2, model_cfg=model_cfg,
                   train_cfg=dataclasses.replace(train_cfg, lr=0.5), progress=False,
                   report=False)
