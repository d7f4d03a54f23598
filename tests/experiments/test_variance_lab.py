"""The gradient-variance study as a command: a folder of results, figures and a report."""

import json

from bayes_router.cli import main
from bayes_router.experiments.variance_lab import variance_lab
from bayes_router.inference.gradient_stats import REFERENCE
from bayes_router.inference.toy_variance import EXPECTED_SLOPES


def test_cli_reports_unknown_estimators(tmp_path, capsys):
    assert main(["variance", "--toy", "--out", str(tmp_path), "--estimators", "nope"]) == 2
    assert "stl" in capsys.readouterr().err


def test_toy_lab_writes_its_outputs(tmp_path):
    variance_lab(tmp_path, toy=True, estimators=["stl", "dreg"], num_draws=200, particles=(),
                 progress=False)
    saved = json.loads((tmp_path / "variance.json").read_text())
    assert set(saved["main"]["estimators"]) == {REFERENCE, "stl", "dreg"}
    assert "particles" not in saved and not (tmp_path / "toy_particles.png").exists()
    assert (tmp_path / "toy_bars.png").stat().st_size > 0
    assert "| dreg | no |" in (tmp_path / "report.md").read_text()


def test_toy_lab_sweeps_particles_into_json_figure_and_report(tmp_path):
    variance_lab(tmp_path, toy=True, estimators=["stl"], num_draws=100, particles=[1, 4, 16],
                 particle_estimators=["reparam-mc", "iwae"], sweep_draws=300, num_bootstrap=20,
                 progress=False)
    saved = json.loads((tmp_path / "variance.json").read_text())
    assert "beta0" not in saved and "along_training" not in saved  # the LM's sweeps only
    sweep = saved["particles"]
    assert sweep["particles"] == [1, 4, 16] and sweep["num_draws"] == 300
    assert sweep["num_bootstrap"] == 20
    fit = sweep["slopes"]["reparam-mc"]["total_variance"]
    assert fit["num_points"] == 3 and fit["interval"][0] < fit["slope"] < fit["interval"][1]
    assert sweep["slopes"]["iwae"]["median_snr"]["num_points"] == 2  # K = 1 skipped
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
