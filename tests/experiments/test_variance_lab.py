"""The gradient-variance study as a command: a folder of results, figures and a report."""

import json

import pytest

from bayes_router.cli import main
from bayes_router.experiments.variance_lab import VarianceLabConfig, variance_lab
from bayes_router.experiments.variance_report import sweep_table
from bayes_router.variance.gradient_stats import REFERENCE
from bayes_router.variance.toy_variance import EXPECTED_SLOPES


def test_cli_reports_unknown_estimators(tmp_path, capsys):
    assert main(["variance", "--toy", "--out", str(tmp_path), "--estimators", "nope"]) == 2
    assert "stl" in capsys.readouterr().err


def test_toy_lab_writes_its_outputs(tmp_path):
    config = VarianceLabConfig(toy=True, estimators=("stl", "dreg"), num_draws=200,
                               particles=())
    variance_lab(tmp_path, config, progress=False)
    saved = json.loads((tmp_path / "variance.json").read_text())
    assert set(saved["main"]["estimators"]) == {REFERENCE, "stl", "dreg"}
    assert "particles" not in saved and not (tmp_path / "toy_particles.png").exists()
    assert (tmp_path / "toy_bars.png").stat().st_size > 0
    assert "| dreg | no |" in (tmp_path / "report.md").read_text()


def test_toy_lab_sweeps_particles_into_json_figure_and_report(tmp_path):
    config = VarianceLabConfig(toy=True, estimators=["stl"], num_draws=100, particles=[1, 4, 16],
                               particle_estimators=["reparam-mc", "iwae"], sweep_draws=300,
                               num_bootstrap=20)
    variance_lab(tmp_path, config, progress=False)
    saved = json.loads((tmp_path / "variance.json").read_text())
    assert "beta0" not in saved and "along_training" not in saved  # the LM's sweeps only
    sweep = saved["particles"]
    assert sweep["particles"] == [1, 4, 16] and sweep["num_draws"] == 300
    assert sweep["num_bootstrap"] == 20
    fit = sweep["slopes"]["reparam-mc"]["total_variance"]
    assert fit["num_points"] == 3 and fit["interval"][0] < fit["slope"] < fit["interval"][1]
    assert sweep["slopes"]["iwae"]["median_snr"]["num_points"] == 2  # K = 1 skipped
    assert set(sweep["estimators"]["iwae"][0]) == {"skipped"}  # a list aligned with K
    assert [p["num_particles"] for p in sweep["estimators"]["reparam-mc"]] == [1, 4, 16]
    assert sweep["expected_slopes"]["iwae"] == EXPECTED_SLOPES["iwae"]
    assert (tmp_path / "toy_particles.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "## Scaling with the number of particles K" in report
    assert f"| reparam-mc | {fit['slope']:+.3f} [" in report
    assert "![Variance, SNR and efficiency against the number of particles K" in report


def test_cli_runs_the_toy_particle_sweep_and_checks_the_bootstrap(tmp_path, capsys):
    assert main(["variance", "--toy", "--out", str(tmp_path / "bad"), "--bootstrap", "-1",
                 "--draws", "50"]) == 2
    assert "num_bootstrap" in capsys.readouterr().err
    out = tmp_path / "sweep"
    assert main(["variance", "--toy", "--out", str(out), "--estimators", "stl", "--draws", "50",
                 "--particles", "2,4", "--particle-estimators", "dreg", "--bootstrap", "5"]) == 0
    sweep = json.loads((out / "variance.json").read_text())["particles"]
    assert sweep["particles"] == [2, 4] and sweep["num_draws"] == 50
    assert sweep["num_bootstrap"] == 5 and list(sweep["slopes"]) == ["dreg"]


def _point(variance):
    return {"groups": {"phi": {"total_variance": variance}}}


def test_sweep_table_reads_each_point_by_its_position_on_the_axis():
    sweep = {"beta0_values": [0.1, 1.0, 10.0], "estimators": {
        "stl": [_point(2.0), {"skipped": "not measured"}, _point(0.25)],
        "dreg": [_point(1.0), _point(0.5), _point(0.125)]}}
    assert sweep_table(sweep, "beta0_values", "phi") == [
        "| estimator | 0.1 | 1.0 | 10.0 |", "|---|---|---|---|",
        "| stl | 2 | n/a | 0.25 |", "| dreg | 1 | 0.5 | 0.125 |"]
    assert sweep_table(sweep, "beta0_values", "theta")[2] == "| stl | n/a | n/a | n/a |"
    keyed = {"steps": [0, 5], "estimators": {"stl": {"0": _point(1.0), "5": _point(2.0)}}}
    with pytest.raises(ValueError, match="stl must be a list aligned"):
        sweep_table(keyed, "steps", "phi")


def test_lm_lab_writes_its_sweeps_as_lists_aligned_with_their_axes(tmp_path):
    """The LM path end to end at toy size: a model trained here for 2 steps, every sweep."""
    config = VarianceLabConfig(train_steps=2, estimators=["reparam-mc"], num_draws=2,
                               sweep_draws=2, particles=(2, 1),
                               particle_estimators=["reparam-mc", "dreg"],
                               beta0_values=(1.0, 0.5), sweep_estimators=["reparam-mc"],
                               along_training=(2, 0))
    variance_lab(tmp_path, config, progress=False)
    saved = json.loads((tmp_path / "variance.json").read_text())
    particles, beta0, along = saved["particles"], saved["beta0"], saved["along_training"]
    assert particles["particles"] == [1, 2]
    assert set(particles["estimators"]["dreg"][0]) == {"skipped"}
    assert [p["num_particles"] for p in particles["estimators"]["reparam-mc"]] == [1, 2]
    assert particles["estimators"]["dreg"][1]["num_particles"] == 2
    assert beta0["beta0_values"] == [0.5, 1.0] and len(beta0["estimators"]["reparam-mc"]) == 2
    assert along["steps"] == [0, 2] and len(along["estimators"]["reparam-mc"]) == 2
    assert along["train_loss"][0] is None and along["train_loss"][1] > 0
    # the last step measured along training is the model the main table measures
    assert along["estimators"]["reparam-mc"][1]["groups"]["phi"]["total_variance"] == \
        saved["main"]["estimators"]["reparam-mc"]["groups"]["phi"]["total_variance"]
    report = (tmp_path / "report.md").read_text()
    assert "| estimator | 1 | 2 |" in report and "| dreg | n/a | " in report
    assert "| estimator | 0.5 | 1.0 |" in report and "| estimator | 0 | 2 |" in report
    for name in ("variance_vs_particles", "variance_vs_beta0", "variance_along_training"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


@pytest.mark.parametrize(("options", "message"), [
    ({"estimators": ["nope"]}, "stl"),
    ({"estimators": []}, "estimators is empty"),
    ({"particle_estimators": ["nope"]}, "particle_estimators: .*stl"),
    ({"sweep_estimators": []}, "sweep_estimators: estimators is empty"),
    ({"num_draws": 1}, r"num_draws \(M\) must be an integer >= 2"),
    ({"sweep_draws": 1}, r"num_draws \(M\) must be an integer >= 2"),
    ({"num_particles": 1, "estimators": ["dreg"]}, "needs num_particles >= 2"),
    ({"particles": [0, 2]}, "particles must be integers >= 1"),
    ({"beta0_values": [1.0, -1.0]}, "beta0_values must be finite numbers > 0"),
    ({"along_training": [5, -1]}, "along_training steps must be >= 0"),
    ({"num_bootstrap": -1}, "num_bootstrap must be an integer >= 0"),
    ({"train_steps": 0}, "train_steps must be >= 1"),
])
def test_the_config_refuses_bad_values_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        VarianceLabConfig(**options)


def test_the_config_holds_tuples_and_refuses_a_string_for_a_list():
    config = VarianceLabConfig(particles=[4, 2], along_training=[0, 5])
    assert config.particles == (4, 2) and config.along_training == (0, 5)
    assert config == VarianceLabConfig(particles=(4, 2), along_training=(0, 5))
    assert VarianceLabConfig(particles=(), beta0_values=()).particles == ()  # sweeps skipped
    with pytest.raises(TypeError, match="particles must be a list or tuple"):
        VarianceLabConfig(particles="1,2")


def test_the_toy_takes_no_checkpoint(tmp_path, capsys):
    with pytest.raises(ValueError, match="exclude each other"):
        variance_lab(tmp_path, VarianceLabConfig(toy=True), tmp_path / "run", progress=False)
    assert main(["variance", "--toy", "--checkpoint", str(tmp_path / "run"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "--toy and --checkpoint exclude each other" in capsys.readouterr().err
