"""Run analysis: files written, numbers consistent with independent computations, damage of hard
routing, figure composition, and clear errors for a run directory without its files."""

import json
import random

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.image import AxesImage

from bayes_router.analysis import (
    area_under_risk_coverage,
    classwise_calibration_error,
    expected_calibration_error,
    reliability_curve,
    risk_coverage_curve,
    routing_accuracy_by_decile,
    smooth_calibration_error,
    smooth_reliability_curve,
    squared_calibration_error,
)
from bayes_router.analysis.report_figures import (
    damage_figure,
    reliability_figure,
    risk_coverage_figure,
    simplex_figure,
    smooth_reliability_figure,
    uncertainty_strip_figure,
)
from bayes_router.cli import main
from bayes_router.data.synthetic import ORACLE_LABELS
from bayes_router.data.tokens import TokenData
from bayes_router.experiments.report import analyse_run, calibrate_run
from bayes_router.experiments.run_loading import load_data
from bayes_router.experiments.training_runs import train_run
from bayes_router.inference.build import load_lm_from_checkpoint
from bayes_router.inference.evaluate import collect_batch_outputs, collect_token_arrays
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.prior_free import PriorFreeRoutedLM

FIGURES = ("reliability.png", "smooth_reliability.png", "uncertainty_strip.png",
           "routing_simplex.png", "expert_share.png", "uncertainty_vs_damage.png",
           "risk_coverage.png")
OPTIONS = dict(max_batches=2, num_samples=4, n_boot=20, progress=False)


def corpus_text(n_words: int = 2400) -> str:
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "cat",
             "def", "return", "x", "=", "(", ")", "\n"]
    return " ".join(rng.choice(words) for _ in range(n_words))


def tiny_configs(vocab_size: int, dataset: str, **train_kwargs):
    model_cfg = TinyLMConfig(vocab_size=vocab_size, d_model=16, n_heads=2, n_layers=2,
                             max_seq_len=32, window=4, chunk_size=8, controller_hidden=8,
                             cost_preset="seed")
    defaults = dict(steps=12, batch_size=8, seq_len=32, eval_every=12, eval_batches=1,
                    checkpoint_every=12, dataset=dataset, dataset_max_chars=None, lr=1e-2)
    return model_cfg, TrainConfig(**{**defaults, **train_kwargs})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny trained Bayesian run and a prior-free one on a small text corpus."""
    root = tmp_path_factory.mktemp("runs")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_text())
    dirs = {}
    for router in ("bayesian", "prior-free"):
        model_cfg, train_cfg = tiny_configs(98, str(corpus), router=router)
        dirs[router] = root / router
        train_run(model_cfg, train_cfg, dirs[router], progress=False, eval_batches=2)
    return dirs


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def strict_json(path):
    """The JSON of ``path``, failing on NaN or Infinity (not valid JSON outside Python)."""
    def refuse(constant):
        raise AssertionError(f"{path.name} holds the non-JSON constant {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _finite_calibration(predictive: dict) -> None:
    for name in ("ece", "ece_equal_mass", "mce", "brier", "nll"):
        entry = predictive[name]
        assert all(np.isfinite([entry["value"], entry["low"], entry["high"]])), name
        assert entry["low"] <= entry["high"], name
    assert 0 <= predictive["ece"]["value"] <= predictive["mce"]["value"] <= 1
    assert 0 <= predictive["ece_equal_mass"]["value"] <= 1
    assert 0 <= predictive["brier"]["value"] <= 2
    for name in ("smooth_ece", "classwise_ece", "debiased_squared_ce"):
        entry = predictive[name]
        assert np.isfinite(entry["value"]) and entry["low"] <= entry["high"], name
    assert 0 < predictive["smooth_ece"]["bandwidth"] <= 1
    band = predictive["smooth_reliability"]
    assert len(band["mesh"]) == len(band["accuracy"]) == len(band["low"]) == 200


def test_bayesian_analysis_writes_files_and_consistent_numbers(runs, tmp_path):
    result = analyse_run(runs["bayesian"], tmp_path, **OPTIONS)
    for name in ("analysis.json", "report.md", "tokens.npz") + FIGURES:
        assert (tmp_path / name).is_file(), name
    report = (tmp_path / "report.md").read_text()
    assert all(f"({name})" in report for name in FIGURES)
    stored = strict_json(tmp_path / "analysis.json")
    assert stored["n_tokens"] == result["n_tokens"] and stored["n_tokens"] % 32 == 0

    predictives = stored["calibration"]["predictives"]
    assert set(predictives) == {"plug_in", "bma"}
    for predictive in predictives.values():
        _finite_calibration(predictive)

    # the plug-in NLL and the hard-routing NLL agree with evaluate.collect_batch_outputs on the
    # same windows
    model, model_cfg, train_cfg, _ = load_lm_from_checkpoint(runs["bayesian"])
    data = load_data(train_cfg, model_cfg)
    soft = collect_batch_outputs(model, data, "val", train_cfg.seq_len, max_batches=2)
    hard = collect_batch_outputs(model, data, "val", train_cfg.seq_len, mode="hard", max_batches=2)
    assert stored["n_tokens"] == soft["nll"].numel()
    assert predictives["plug_in"]["nll"]["value"] == pytest.approx(float(soft["nll"].mean()),
                                                                   rel=1e-5)
    assert stored["damage"]["soft_nll"] == pytest.approx(float(soft["nll"].mean()), rel=1e-6)
    assert stored["damage"]["hard_nll"] == pytest.approx(float(hard["nll"].mean()), rel=1e-6)
    probs = soft["logits"].softmax(-1)
    assert predictives["plug_in"]["ece"]["value"] == pytest.approx(
        expected_calibration_error(probs, soft["targets"]), abs=1e-6)

    tokens = np.load(tmp_path / "tokens.npz")
    assert np.all(tokens["damage"] >= 0) and np.all(np.isfinite(tokens["damage"]))
    np.testing.assert_allclose(tokens["uncertainty_total"],
                               tokens["uncertainty_aleatoric"] + tokens["uncertainty_epistemic"],
                               atol=1e-6)
    assert stored["damage"]["mean"] == pytest.approx(float(tokens["damage"].mean()))
    measures = stored["diagnostics"]["measures"]
    assert {"total", "aleatoric", "epistemic", "neg_log_concentration"} <= set(measures)
    assert stored["routing_accuracy"] is None  # a text corpus has no oracle

    # the new calibration measures equal the public metrics on the plug-in predictive
    plug_in = predictives["plug_in"]
    assert plug_in["smooth_ece"]["value"] == pytest.approx(
        smooth_calibration_error(probs, soft["targets"]), abs=1e-6)
    assert plug_in["classwise_ece"]["value"] == pytest.approx(
        classwise_calibration_error(probs, soft["targets"]), abs=1e-6)
    assert plug_in["debiased_squared_ce"]["value"] == pytest.approx(
        squared_calibration_error(probs, soft["targets"]), abs=1e-6)
    assert "smooth ECE" in report and "Selective prediction" in report

    # selective prediction: the AURCs of the stored per-token arrays, entropy as reference
    selective = stored["selective_prediction"]
    assert selective["reference"] == "predictive_entropy (reference)"
    error = selective["losses"]["error"]
    assert set(error["scores"]) == {"total", "aleatoric", "epistemic", "neg_log_concentration",
                                    "predictive_entropy (reference)", "random score"}
    correct = (probs.argmax(-1) == soft["targets"]).numpy()
    assert error["overall"] == pytest.approx(1 - correct.mean())
    assert error["scores"]["total"]["aurc"]["value"] == pytest.approx(
        area_under_risk_coverage(tokens["uncertainty_total"].mean(0), 1.0 - correct))
    assert selective["losses"]["nll"]["scores"]["aleatoric"]["aurc"]["value"] == pytest.approx(
        area_under_risk_coverage(tokens["uncertainty_aleatoric"].mean(0), tokens["nll"]))
    reference = error["scores"]["predictive_entropy (reference)"]["minus_reference"]
    assert reference["value"] == reference["low"] == reference["high"] == 0
    for loss, verdict in selective["verdict"].items():
        assert ("beats the predictive entropy" in report or "beat the predictive entropy"
                in report or "no routing measure beats" in report), loss
        assert verdict["best_routing_measure"] in measures


def test_prior_free_analysis_has_plug_in_and_entropy_only(runs, tmp_path):
    result = analyse_run(runs["prior-free"], tmp_path, **OPTIONS)
    assert set(result["selective_prediction"]["losses"]["error"]["scores"]) == {
        "total", "predictive_entropy (reference)", "random score"}
    assert set(result["calibration"]["predictives"]) == {"plug_in"}
    _finite_calibration(result["calibration"]["predictives"]["plug_in"])
    assert set(result["uncertainty"]["per_layer"][0]) == {"total"}
    assert result["num_samples"] is None
    for name in FIGURES:
        assert (tmp_path / name).is_file(), name


def test_calibrate_run_writes_the_calibration_part(runs, tmp_path):
    result = calibrate_run(runs["bayesian"], tmp_path, **OPTIONS)
    for name in ("calibration.json", "calibration.md", "reliability.png",
                 "smooth_reliability.png"):
        assert (tmp_path / name).is_file()
    assert "smooth ECE" in (tmp_path / "calibration.md").read_text()
    assert not (tmp_path / "analysis.json").exists()
    stored = strict_json(tmp_path / "calibration.json")
    assert stored["predictives"]["bma"]["nll"]["value"] == pytest.approx(
        result["predictives"]["bma"]["nll"]["value"])
    diff = stored["bma_minus_plug_in"]["nll"]["value"]
    assert diff == pytest.approx(stored["predictives"]["bma"]["nll"]["value"]
                                 - stored["predictives"]["plug_in"]["nll"]["value"], abs=1e-9)


def _one_hot_prior_free(vocab_size: int) -> PriorFreeRoutedLM:
    cfg = TinyLMConfig(vocab_size=vocab_size, d_model=16, n_heads=2, n_layers=2, max_seq_len=32,
                       window=4, chunk_size=8, controller_hidden=8)
    model = PriorFreeRoutedLM(cfg)
    with torch.no_grad():
        for controller in model.controllers:  # zero last weights: the logits are the bias
            controller.net[-1].bias.copy_(torch.tensor([0.0, 1e4, 0.0]))
    return model.eval()


def test_one_hot_router_routes_every_token_to_one_expert():
    model = _one_hot_prior_free(98)
    x = torch.randint(0, 98, (3, 32))
    weights = model.predict(x).routing[0].decision.weights
    assert torch.equal(weights, torch.nn.functional.one_hot(torch.ones(3, 32).long(), 3).float())


def test_collected_damage_is_the_kl_between_soft_and_hard_predictives():
    torch.manual_seed(1)
    cfg = TinyLMConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=2, max_seq_len=32,
                       window=4, chunk_size=8, controller_hidden=8)
    model = BayesianRoutedLM(cfg).eval()
    with torch.no_grad():
        for controller in model.controllers:
            torch.nn.init.normal_(controller.net[-1].weight, std=2.0)
    data = TokenData("random", {"val": torch.randint(0, 50, (2 * 32 + 1,))}, vocab_size=50)
    damage = torch.from_numpy(collect_token_arrays(model, data, "val", 32, num_samples=1).damage)
    (x, _), = data.eval_batches("val", 16, 32)
    with torch.no_grad():
        log_p = model.predict(x, mode="soft").logits.double().log_softmax(-1)
        log_q = model.predict(x, mode="hard").logits.double().log_softmax(-1)
    naive = (log_p.exp() * (log_p - log_q)).sum(-1).reshape(-1)
    torch.testing.assert_close(damage, naive.clamp_min(0), atol=1e-10, rtol=1e-8)
    assert bool((damage >= 0).all()) and bool((damage > 0).any())


def test_collected_damage_is_zero_for_a_one_hot_router(runs):
    model, model_cfg, train_cfg, _ = load_lm_from_checkpoint(runs["prior-free"])
    data = load_data(train_cfg, model_cfg)
    arrays = collect_token_arrays(_one_hot_prior_free(98), data, "val", 32, max_batches=1)
    assert np.array_equal(arrays.damage, np.zeros_like(arrays.damage))
    assert arrays.bma_probs is None and arrays.concentration is None


def test_routing_accuracy_against_the_oracle_of_a_synthetic_task(tmp_path):
    model_cfg, train_cfg = tiny_configs(64, "synthetic:mixed", steps=4, eval_every=4,
                                        checkpoint_every=4)
    train_run(model_cfg, train_cfg, tmp_path / "run", progress=False, eval_batches=1)
    result = analyse_run(tmp_path / "run", max_batches=1, num_samples=2, n_boot=5,
                         progress=False)
    assert (tmp_path / "run" / "analysis" / "report.md").is_file()
    rows = result["routing_accuracy"]
    assert [row["layer"] for row in rows] == [0, 1]
    # independently: argmax expert (by name) against the oracle labels of the same windows
    data = load_data(train_cfg, model_cfg)
    _, _, oracle = next(data.eval_batches_with_oracle("val", 16, 32, max_batches=1))
    oracle = oracle.reshape(-1).numpy()
    tokens = np.load(tmp_path / "run" / "analysis" / "tokens.npz")
    for row, abar, total in zip(rows, tokens["abar"], tokens["uncertainty_total"]):
        chosen = np.array([ORACLE_LABELS.index(model_cfg.experts[k]) for k in abar.argmax(-1)])
        labelled = oracle != -1
        assert row["accuracy"] == pytest.approx(np.mean(chosen[labelled] == oracle[labelled]))
        expected = routing_accuracy_by_decile(chosen, oracle, total)
        np.testing.assert_allclose(row["bin_accuracy"], expected["bin_accuracy"])
    # the decisions' calibration scores the same decisions (every label names an expert here)
    for row, decisions, abar in zip(rows, result["decision_calibration"], tokens["abar"]):
        assert decisions["accuracy"] == pytest.approx(row["accuracy"])
        assert decisions["n_tokens"] == row["n_tokens"]
        labelled = oracle != -1
        assert decisions["confidence"]["argmax_weight"]["mean"] == pytest.approx(
            abar.max(-1)[labelled].mean())
        assert set(decisions["confidence"]) == {"argmax_weight", "argmax_probability"}
    assert (tmp_path / "run" / "analysis" / "decisions.png").is_file()
    assert "## Calibration of the routing decisions against the oracle" in (
        tmp_path / "run" / "analysis" / "report.md").read_text()
    # per-label prediction quality: the same NLLs as the run's own evaluation of those windows
    from bayes_router.inference.build import load_lm_from_checkpoint
    from bayes_router.inference.evaluate import evaluate

    model, *_ = load_lm_from_checkpoint(tmp_path / "run")
    own = evaluate(model, data, "val", 32, max_batches=1)["oracle"]
    labels = result["oracle_labels"]
    assert set(labels) == set(own)
    for name, entry in labels.items():
        assert entry["tokens"] == own[name]["tokens"]
        assert entry["nll"] == pytest.approx(own[name]["nll"], rel=1e-4)
        assert entry["accuracy"] == pytest.approx(own[name]["accuracy"])
    assert "Prediction quality per oracle label" in (
        tmp_path / "run" / "analysis" / "report.md").read_text()


# ------------------------------------------------------------------------------------ figures


def test_reliability_figure_has_one_panel_per_predictive():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=200)
    labels = rng.integers(0, 5, 200)
    curves = {"plug-in": reliability_curve(probs, labels, 15),
              "BMA": reliability_curve(probs ** 0.5 / (probs ** 0.5).sum(1, keepdims=True),
                                       labels, 15)}
    fig = reliability_figure(curves, {"plug-in": 0.1, "BMA": 0.2})
    assert len(fig.axes) == 2
    for ax, curve in zip(fig.axes, curves.values()):
        assert len(ax.patches) == int((curve.count > 0).sum())
    assert fig.axes[1].get_title() == "BMA: ECE 0.200"


def test_smooth_reliability_and_risk_coverage_figures_compose_the_panels():
    rng = np.random.default_rng(3)
    f = rng.uniform(0, 1, 300)
    y = (rng.uniform(size=300) < f).astype(float)
    curves = {"plug-in": smooth_reliability_curve(f, y), "BMA": smooth_reliability_curve(f, 1 - y)}
    fig = smooth_reliability_figure(curves)
    assert len(fig.axes) == 2 and fig.axes[1].get_title().startswith("BMA:\nsmECE")
    risk = {"error": {"a": risk_coverage_curve(f, 1 - y), "b": risk_coverage_curve(-f, 1 - y)},
            "nll": {"a": risk_coverage_curve(f, f)}}
    fig = risk_coverage_figure(risk, {"error": risk_coverage_curve(1 - y, 1 - y)}, "b")
    assert [len(ax.lines) for ax in fig.axes] == [3, 1]
    assert fig.axes[0].lines[1].get_color() == "black"  # the reference
    with pytest.raises(ValueError, match="empty"):
        risk_coverage_figure({})


def test_strip_simplex_and_damage_figures_compose_the_panels():
    text = "def f(x):\n\treturn x"
    strip = uncertainty_strip_figure(text, {"total": np.random.rand(2, len(text)),
                                            "epistemic": np.random.rand(2, len(text))})
    images = [ax for ax in strip.axes if any(isinstance(a, AxesImage) for a in ax.get_children())]
    assert len(images) == 2 and len(strip.axes) == 4  # two strips and their colorbars
    assert [t.get_text() for t in images[0].get_xticklabels()][-2:] == [" ", "x"]
    assert "\\n" in [t.get_text() for t in images[0].get_xticklabels()]
    fixed = uncertainty_strip_figure(text, {"total": np.random.rand(2, len(text))}, (0.0, 2.0))
    assert fixed.axes[0].images[0].get_clim() == (0.0, 2.0)

    samples = np.random.default_rng(0).dirichlet([1.0, 2.0, 3.0], size=50)
    panels = [{"title": "layer 0", "prior_mean": np.array([0.2, 0.5, 0.3]),
               "points": [{"samples": samples, "label": f"token {i}"} for i in range(3)]},
              {"title": "layer 1", "prior_mean": None,
               "points": [{"samples": samples, "label": "tokens"}]}]
    fig = simplex_figure(panels)
    scatters = [[c for c in ax.collections if isinstance(c, PathCollection)] for ax in fig.axes]
    assert [len(s) for s in scatters] == [3 + 1, 1]  # one per token, plus the prior-mean star
    assert [ax.get_title() for ax in fig.axes] == ["layer 0", "layer 1"]

    concentration = np.random.default_rng(1).uniform(0.2, 3.0, size=(2, 300, 3))
    from bayes_router.core.dirichlet import routing_uncertainty
    parts = routing_uncertainty(concentration)
    uncertainty = {"total": parts.total, "aleatoric": parts.aleatoric,
                   "epistemic": parts.epistemic, "concentration": parts.concentration}
    fig = damage_figure(uncertainty, np.random.default_rng(2).random(300))
    assert len(fig.axes) == 4
    assert [len(ax.lines) for ax in fig.axes] == [3, 3, 3, 3]  # two layers and their mean
    assert fig.axes[3].get_xlabel() == "neg log concentration"


# ------------------------------------------------------------------------------ bad input + CLI


def test_a_run_dir_without_its_files_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for fn in (analyse_run, calibrate_run):
        with pytest.raises(ValueError, match="missing"):
            fn(tmp_path / "empty", progress=False)
        with pytest.raises(ValueError, match="does not exist"):
            fn(tmp_path / "nowhere", progress=False)
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert main(["calibrate", str(tmp_path / "empty")]) == 2


def test_bad_options_are_rejected(runs):
    with pytest.raises(ValueError, match="n_boot"):
        analyse_run(runs["bayesian"], n_boot=0, progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        calibrate_run(runs["bayesian"], max_batches=0, progress=False)


def test_cli_calibrate_and_report_compare(runs, tmp_path, capsys):
    small = ["--max-batches", "1", "--num-samples", "2", "--n-boot", "5"]
    assert main(["calibrate", str(runs["bayesian"]), "--out", str(tmp_path / "cal"), *small]) == 0
    assert (tmp_path / "cal" / "calibration.md").is_file()
    assert main(["report", str(runs["bayesian"]), str(runs["prior-free"]), "--compare",
                 str(tmp_path / "cmp"), *small]) == 0
    assert (tmp_path / "cmp" / "reliability_comparison.png").is_file()
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert table.count("| bayesian |") == 2 and table.count("| prior-free |") == 1
    for router in ("bayesian", "prior-free"):
        assert (runs[router] / "analysis" / "report.md").is_file()
    assert main(["report", str(runs["bayesian"]), str(runs["prior-free"]), "--out",
                 str(tmp_path / "x")]) == 2
    assert "prior-free" in capsys.readouterr().out
