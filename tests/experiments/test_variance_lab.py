"""The gradient-variance study as a command: a folder of results, figures and a report."""

import json

from bayes_router.cli import main
from bayes_router.experiments.variance_lab import variance_lab
from bayes_router.inference.gradient_stats import REFERENCE


def test_cli_reports_unknown_estimators(tmp_path, capsys):
    assert main(["variance", "--toy", "--out", str(tmp_path), "--estimators", "nope"]) == 2
    assert "stl" in capsys.readouterr().err


def test_toy_lab_writes_its_outputs(tmp_path):
    variance_lab(tmp_path, toy=True, estimators=["stl", "dreg"], num_draws=200, progress=False)
    saved = json.loads((tmp_path / "variance.json").read_text())
    assert set(saved["main"]["estimators"]) == {REFERENCE, "stl", "dreg"}
    assert (tmp_path / "toy_bars.png").stat().st_size > 0
    assert "| dreg | no |" in (tmp_path / "report.md").read_text()
