"""``bayes-router evidence`` on tiny run directories: outputs, reference prior, bad input."""

import json

import numpy as np
import pytest

from bayes_router.cli import main
from bayes_router.experiments.evidence import evidence_run
from bayes_router.experiments.training_runs import train_run
from tests.helpers import tiny_configs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, tiny_corpus):
    root = tmp_path_factory.mktemp("evidence")
    for router in ("bayesian", "prior-free"):
        model_cfg, train_cfg = tiny_configs(tiny_data, tiny_corpus, router=router, steps=3)
        train_run(model_cfg, train_cfg, root / router, progress=False, eval_batches=1,
                  data=tiny_data)
    return root


def test_evidence_of_a_bayesian_run(runs, tmp_path):
    result = evidence_run(runs / "bayesian", tmp_path / "ev", tokens=12, windows=2)
    for name in ("evidence.json", "evidence.png", "report.md"):
        assert (tmp_path / "ev" / name).exists()
    stored = json.loads((tmp_path / "ev" / "evidence.json").read_text())
    assert stored["tokens"] == 12 and len(stored["layers"]) == 2
    layer = stored["layers"][0]
    assert set(layer["summary"]) == {"full", "linear", "local"}
    assert len(layer["tokens"]["gain"]) == 12 and layer["kl_current_mean"] > 0
    # the cost of an expert is the same for every token; its levels are ordered
    for name, s in layer["summary"].items():
        costs = [s["levels"][lv]["cost"] for lv in ("argmax", "0.5", "0.9")]
        assert costs == sorted(costs), name
    assert "Layer 1" in (tmp_path / "ev" / "report.md").read_text()
    assert result["prior"] == "power"
    # the KL split covers every token of the windows and adds up to their mean KL
    split = layer["kl_split"]
    assert split["n_tokens"] == 2 * 32  # windows x seq_len
    assert split["information"] + split["marginal_kl"] == pytest.approx(split["kl"], abs=1e-12)
    assert "I(x; alpha)" in (tmp_path / "ev" / "report.md").read_text()
    # the decisions' calibration: against the best gain of the very tokens sampled
    decisions = layer["decisions"]["counterfactual"]
    best = np.asarray(layer["tokens"]["gain"]).argmax(1)
    assert decisions["n_tokens"] == 12
    assert decisions["best_share"] == pytest.approx(np.bincount(best, minlength=3) / 12)
    assert set(decisions["confidence"]) == {"argmax_weight", "argmax_probability"}
    assert set(decisions["auroc_wrong"]) == {"total", "aleatoric", "epistemic",
                                             "low concentration"}
    assert (tmp_path / "ev" / "decisions.png").exists()
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "AUROC for picking out the wrong decisions" in report


def test_evidence_of_a_prior_free_run_uses_the_reference_prior(runs, tmp_path):
    result = evidence_run(runs / "prior-free", tmp_path / "ev", tokens=6, windows=1)
    assert result["prior"] == "reference power prior"
    assert result["layers"][0]["kl_current_mean"] == pytest.approx(0.0)
    assert result["layers"][0]["kl_split"] is None  # no guide: nothing to split
    decisions = result["layers"][0]["decisions"]["counterfactual"]
    assert set(decisions["confidence"]) == {"argmax_weight"}
    assert set(decisions["auroc_wrong"]) == {"entropy"}


def test_evidence_scores_the_decisions_against_an_oracle(tmp_path, tiny_data):
    from bayes_router.data.tokens import token_data

    data = token_data("synthetic:recall")
    model_cfg, train_cfg = tiny_configs(data, "synthetic:recall", router="bayesian", steps=3)
    train_run(model_cfg, train_cfg, tmp_path / "run", progress=False, eval_batches=1, data=data)
    result = evidence_run(tmp_path / "run", tmp_path / "ev", tokens=24, windows=2)
    oracle = result["layers"][0]["decisions"]["oracle"]
    assert 0 < oracle["n_tokens"] <= 24
    assert sum(oracle["best_share"]) == pytest.approx(1.0)
    assert "against the oracle's expert" in (tmp_path / "ev" / "report.md").read_text()


def test_evidence_cli_bad_input(runs, tmp_path, capsys):
    assert main(["evidence", str(runs / "bayesian"), "--tokens", "0",
                 "--out", str(tmp_path / "x")]) == 2
    assert "tokens must be an integer >= 1" in capsys.readouterr().err
    assert main(["evidence", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
