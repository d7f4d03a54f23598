"""Empirical Bayes for beta0 on run folders (``bayes-router fit-beta0``)."""

import json
import math

import pytest

from bayes_router.cli import main
from bayes_router.experiments.beta0_fit import Beta0FitConfig, fit_beta0_run
from bayes_router.experiments.sweep import read_beta0_mark
from bayes_router.experiments.training_runs import train_run
from tests.helpers import tiny_configs as configs


@pytest.fixture(scope="module")
def fixed_run(tiny_data, tiny_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "fixed"
    model_cfg, train_cfg = configs(tiny_data, tiny_corpus)
    train_run(model_cfg, train_cfg, run, progress=False, eval_batches=1, data=tiny_data)
    return run


def test_fit_beta0_run_with_both_methods_writes_beta0_json(fixed_run, tmp_path):
    config = Beta0FitConfig(method="both", svi_steps=20, stat_batches=2, eval_batches=1)
    result = fit_beta0_run(fixed_run, config, tmp_path, progress=False)
    saved = json.loads((tmp_path / "beta0.json").read_text())
    assert saved["beta0"] == pytest.approx(result["beta0"])
    assert len(saved["beta0"]) == 2 and all(v > 0 for v in saved["beta0"])
    for layer, entry in enumerate(saved["layers"]):
        assert entry["layer"] == layer and entry["beta0_svi"] > 0 and entry["beta0_minka"] > 0
        geometric = math.sqrt(entry["beta0_svi"] * entry["beta0_minka"])
        assert saved["beta0"][layer] == pytest.approx(geometric)
    assert {"settled", "last_iterate", "tail_log_drift"} <= set(saved["estimates"]["svi"])
    assert {"run", "svi", "minka", "minka_after_svi", "heldout_optimum", "svi_continued_model",
            "fixed_continued_model"} <= set(saved["elbo"])
    estimates = [v for entry in saved["layers"] for k, v in entry.items() if "beta0" in k]
    assert read_beta0_mark(tmp_path / "beta0.json") == pytest.approx(
        sum(estimates + saved["beta0"]) / (len(estimates) + len(saved["beta0"])))
    # the held-out optimum is the best beta0 for the fixed guide, on the grid too
    best = saved["elbo"]["heldout_optimum"]["elbo"]
    assert all(best >= e["elbo"] - 1e-9 for name, e in saved["elbo"].items()
               if not name.endswith("continued_model"))
    for kl, optimum_kl in zip(saved["grid"]["kl"], saved["elbo"]["heldout_optimum"]["kl"],
                              strict=True):
        assert optimum_kl <= min(kl) + 1e-9
    assert (tmp_path / "beta0.png").stat().st_size > 0
    assert "| minka |" in (tmp_path / "report.md").read_text()


def test_a_learned_run_is_read_not_retrained(tiny_data, tiny_corpus, tmp_path):
    run = tmp_path / "learned"
    model_cfg, train_cfg = configs(tiny_data, tiny_corpus, beta0="learn", steps=5,
                                   eval_every=5, checkpoint_every=5)
    metrics = train_run(model_cfg, train_cfg, run, progress=False, eval_batches=1,
                        data=tiny_data)
    config = Beta0FitConfig(method="svi", stat_batches=1, eval_batches=1)
    result = fit_beta0_run(run, config, tmp_path / "eb", progress=False)
    assert result["estimates"]["svi"]["values"] == pytest.approx(metrics["beta0"])
    assert "minka" not in result["estimates"]
    assert result["beta0"] == pytest.approx(metrics["beta0"])


def test_bad_method_and_prior_free_runs_are_rejected(tiny_data, tiny_corpus, fixed_run,
                                                     tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        Beta0FitConfig(method="newton")
    run = tmp_path / "pf"
    model_cfg, train_cfg = configs(tiny_data, tiny_corpus, router="prior-free", steps=2,
                                   eval_every=2, checkpoint_every=2)
    train_run(model_cfg, train_cfg, run, progress=False, eval_batches=1, data=tiny_data)
    with pytest.raises(ValueError, match="needs a Bayesian run"):
        fit_beta0_run(run, Beta0FitConfig(method="minka"), tmp_path / "out", progress=False)


def test_cli_fit_beta0(fixed_run, tmp_path, capsys):
    code = main(["fit-beta0", str(fixed_run), "--method", "minka", "--out", str(tmp_path),
                 "--stat-batches", "1", "--eval-batches", "1", "--update-pi"])
    assert code == 0
    saved = json.loads((tmp_path / "beta0.json").read_text())
    assert [entry["beta0_minka"] for entry in saved["layers"]] == pytest.approx(saved["beta0"])
    assert len(saved["estimates"]["minka"]["full_mean"]) == 2
    assert "Empirical Bayes for beta0" in capsys.readouterr().out


@pytest.mark.parametrize(("options", "message"), [
    ({"svi_steps": 0}, "svi_steps must be an integer >= 1"),
    ({"beta0_lr": 0.0}, "beta0_lr must be a finite number > 0"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"stat_batches": 0}, "stat_batches must be an integer >= 1"),
    ({"eval_batches": 0}, "eval_batches must be an integer >= 1"),
    ({"grid": ()}, "grid must hold positive beta0 values"),
    ({"grid": (1.0, -2.0)}, "grid must hold positive beta0 values"),
])
def test_the_config_refuses_bad_values_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        Beta0FitConfig(**options)
