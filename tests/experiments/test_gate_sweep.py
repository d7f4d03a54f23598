"""``bayes-router gate-sweep`` on tiny runs: every point of both gates, the random gate at the
uncertainty gate's soft fraction, the files, the refusals."""

import dataclasses
import json

import pytest
import torch

from bayes_router.cli import main
from bayes_router.experiments.gate_sweep import gate_sweep
from bayes_router.experiments.training_runs import train_run
from bayes_router.inference.timing import DECODE_STEPS
from bayes_router.models import BayesianRoutedLM, TinyLMConfig
from tests.helpers import tiny_configs

THRESHOLDS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, tiny_corpus):
    root = tmp_path_factory.mktemp("gate-sweep")
    for router in ("bayesian", "prior-free", "fixed:local"):
        model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, steps=3)
        train_cfg = dataclasses.replace(train_cfg, router=router)
        train_run(model_cfg, train_cfg, root / router.replace(":", "-"), progress=False,
                  eval_batches=1, data=tiny_data)
    return root


def test_a_bayesian_run_sweeps_both_measures_and_their_controls(runs, tmp_path):
    result = gate_sweep(runs / "bayesian", tmp_path / "s", THRESHOLDS, eval_batches=1,
                        repeats=1, progress=False)
    assert {p["gate"] for p in result["points"]} == {"total", "epistemic", "random"}
    assert len(result["points"]) == 2 * 2 * len(THRESHOLDS)
    for p in result["points"]:
        assert 0.0 <= p["soft_fraction"] <= 1.0 and p["val_nll"] > 0
        assert p["decode_time_ratio"] > 0
    total = [p for p in result["points"] if p["gate"] == "total"]
    assert total[0]["soft_fraction"] == 1.0  # threshold 0: nothing goes hard
    for p in result["points"]:
        if p["gate"] == "random":  # its threshold is one minus the soft fraction it matches
            source = next(q for q in result["points"] if q["gate"] == p["matched_to"]
                          and abs(1 - q["soft_fraction"] - p["threshold"]) < 1e-12)
            if source["soft_fraction"] in (0.0, 1.0):  # the draws are in [0, 1): exact
                assert p["soft_fraction"] == source["soft_fraction"]
    stored = json.loads((tmp_path / "s" / "gate_sweep.json").read_text())
    assert stored["points"] == result["points"]
    assert (tmp_path / "s" / "gate_sweep.png").stat().st_size > 0
    assert "## epistemic uncertainty" in (tmp_path / "s" / "report.md").read_text()


def test_a_prior_free_run_has_one_measure(runs, tmp_path):
    result = gate_sweep(runs / "prior-free", tmp_path / "s", (0.5,), eval_batches=1,
                        repeats=1, progress=False)
    assert result["measures"] == ["total"] and len(result["points"]) == 2


def test_a_static_run_and_bad_thresholds_are_refused(runs, tmp_path):
    with pytest.raises(ValueError, match="needs a learned router"):
        gate_sweep(runs / "fixed-local", tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match=r"thresholds must be numbers in \[0, 1\]"):
        gate_sweep(runs / "bayesian", tmp_path / "s", (0.5, 1.5), progress=False)
    assert main(["gate-sweep", str(runs / "bayesian"), "--out", str(tmp_path / "c"),
                 "--thresholds", "2"]) == 2
    assert not (tmp_path / "c" / "gate_sweep.json").exists()


def test_the_random_measure_sends_the_asked_fraction_soft():
    cfg = TinyLMConfig(vocab_size=11, d_model=16, n_heads=2, max_seq_len=64, window=3)
    model = BayesianRoutedLM(cfg).eval()
    x = torch.randint(0, 11, (8, 64))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model.predict(x, "gated", 0.3, gate_measure="random", generator=g)
    hard = torch.cat([r.hard_mask.flatten() for r in out.routing]).float()
    n = hard.numel()
    assert abs(float(hard.mean()) - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5


def test_default_thresholds_are_quantiles_at_the_asked_soft_fractions(runs, tmp_path):
    """Each measure's own quantiles: the soft fraction lands near the one asked for (exactly at
    0 and 1), whatever the spread of the router's uncertainty."""
    result = gate_sweep(runs / "prior-free", tmp_path / "q", soft_fractions=(0.0, 0.5, 1.0),
                        eval_batches=1, repeats=1, progress=False)
    gated = [p for p in result["points"] if p["gate"] == "total"]
    assert [p["soft_fraction"] for p in gated][0] == 0.0
    assert [p["soft_fraction"] for p in gated][-1] == 1.0
    assert abs(gated[1]["soft_fraction"] - 0.5) < 0.1
    assert result["soft_fractions"] == [0.0, 0.5, 1.0]
    assert len(result["thresholds"]["total"]) == 3


def test_a_rotary_run_sweeps_past_its_training_length(runs, tiny_data, tiny_corpus, tmp_path):
    """Windows of 64 tokens for a run trained on 32: every NLL on the same tokens, the decoding
    steps timed at their context; a run with learned positions is refused that length."""
    model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, steps=2, router="prior-free")
    model_cfg = dataclasses.replace(model_cfg, positions="rotary")
    train_run(model_cfg, train_cfg, tmp_path / "rotary", progress=False, eval_batches=1,
              data=tiny_data)
    result = gate_sweep(tmp_path / "rotary", tmp_path / "s", (0.5,), eval_batches=1, repeats=1,
                        progress=False, seq_len=64)
    assert (result["seq_len"], result["train_seq_len"]) == (64, 32)
    windows = min(16, tiny_data.num_windows("val", 64))
    assert {p["tokens"] for p in result["points"]} == {64 * windows}
    assert {p["decode_context"] for p in result["points"]} == {64 - DECODE_STEPS}
    assert f"{64 * windows} tokens in windows of 64" in (tmp_path / "s" / "report.md").read_text()
    with pytest.raises(ValueError, match="past the model's max_seq_len=32"):
        gate_sweep(runs / "prior-free", tmp_path / "t", (0.5,), progress=False, seq_len=64)
