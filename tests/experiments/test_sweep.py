"""The beta0 sweep: resumes without redoing finished points, rejects bad values and mismatched
runs, aggregates over seeds, reads empirical-Bayes marks leniently, and runs points in parallel."""

import json
import math
import random

import matplotlib.pyplot as plt
import numpy as np
import pytest

import bayes_router.experiments.training_runs as training_runs_module
from bayes_router.cli import main
from bayes_router.experiments.sweep import (
    SWEEP_METRICS,
    point_dir,
    read_beta0_mark,
    sweep_beta0,
    sweep_figure,
    sweep_table,
)
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.config import TinyLMConfig


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "def", "x", "\n"]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(2000)))
    return str(path)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def configs(corpus: str, **train_kwargs):
    model_cfg = TinyLMConfig(vocab_size=98, d_model=16, n_heads=2, n_layers=2, max_seq_len=32,
                             window=4, chunk_size=8, controller_hidden=8, cost_preset="seed")
    defaults = dict(steps=6, batch_size=8, seq_len=32, eval_every=6, eval_batches=1,
                    checkpoint_every=6, dataset=corpus, dataset_max_chars=None, lr=1e-2)
    return model_cfg, TrainConfig(**{**defaults, **train_kwargs})


@pytest.fixture
def counted_training(monkeypatch):
    """Count the trainings the sweep starts (in this process, through training_runs.train_runs)."""
    trained = []
    real = training_runs_module.train_run

    def counting(model_cfg, train_cfg, out_dir, **kwargs):
        trained.append((train_cfg.beta0, train_cfg.seed))
        return real(model_cfg, train_cfg, out_dir, **kwargs)

    monkeypatch.setattr(training_runs_module, "train_run", counting)
    return trained


def test_an_interrupted_sweep_trains_only_the_missing_points(corpus, tmp_path, counted_training):
    model_cfg, train_cfg = configs(corpus)
    sweep_beta0([0.5], [0], tmp_path, model_cfg, train_cfg, progress=False, eval_batches=1)
    assert counted_training == [(0.5, 0)]
    first = point_dir(tmp_path, 0.5, 0)
    assert first == tmp_path / "beta0=0.5" / "seed0"
    stamp = (first / "metrics.json").stat().st_mtime_ns

    result = sweep_beta0([0.5, 2.0], [0], tmp_path, model_cfg, train_cfg, progress=False,
                         eval_batches=1)
    assert counted_training == [(0.5, 0), (2.0, 0)]  # only the missing point was trained
    assert (first / "metrics.json").stat().st_mtime_ns == stamp
    for name in ("sweep.json", "sweep_beta0.png", "report.md"):
        assert (tmp_path / name).is_file()
    stored = json.loads((tmp_path / "sweep.json").read_text(),
                        parse_constant=lambda constant: pytest.fail(f"non-JSON {constant}"))
    assert stored["values"] == [0.5, 2.0] and stored["seeds"] == [0]
    for key in SWEEP_METRICS:
        assert all(math.isfinite(v) for v in stored["metrics"][key]["mean"]), key
    points = {(p["beta0"], p["seed"]): p for p in result["points"]}
    metrics = json.loads((point_dir(tmp_path, 2.0, 0) / "metrics.json").read_text())
    assert points[2.0, 0]["val_nll_hard"] == metrics["hard"]["val_nll"]
    assert 0 <= points[2.0, 0]["ece"] <= 1 and points[2.0, 0]["mutual_information"] >= 0

    # a point whose evaluation file is missing is re-evaluated, not retrained
    (point_dir(tmp_path, 2.0, 0) / "sweep_point.json").unlink()
    sweep_beta0([0.5, 2.0], [0], tmp_path, model_cfg, train_cfg, progress=False,
                eval_batches=1)
    assert len(counted_training) == 2
    assert (point_dir(tmp_path, 2.0, 0) / "sweep_point.json").is_file()

    # a finished point trained under another configuration is refused, not silently reused
    _, longer = configs(corpus, steps=7)
    with pytest.raises(ValueError, match="another configuration"):
        sweep_beta0([0.5], [0], tmp_path, model_cfg, longer, progress=False)


@pytest.mark.parametrize("values", [[0.1, 0.0], [-1.0], [float("nan")], [], [1.0, 1.0]])
def test_bad_values_are_rejected(corpus, tmp_path, values):
    model_cfg, train_cfg = configs(corpus)
    with pytest.raises(ValueError, match="values"):
        sweep_beta0(values, 1, tmp_path, model_cfg, train_cfg, progress=False)


def test_bad_sweep_settings_are_rejected(corpus, tmp_path):
    model_cfg, train_cfg = configs(corpus)
    _, prior_free = configs(corpus, router="prior-free")
    with pytest.raises(ValueError, match="router"):
        sweep_beta0([1.0], 1, tmp_path, model_cfg, prior_free, progress=False)
    with pytest.raises(ValueError, match="jobs"):
        sweep_beta0([1.0], 1, tmp_path, model_cfg, train_cfg, jobs=0, progress=False)
    with pytest.raises(ValueError, match="seeds"):
        sweep_beta0([1.0], 0, tmp_path, model_cfg, train_cfg, progress=False)
    assert main(["sweep-beta0", "--values", "0.1,-3", "--out", str(tmp_path), "--corpus",
                 corpus]) == 2


def test_sweep_table_aggregates_over_seeds():
    points = {(v, s): {key: v * 10 + s for key in SWEEP_METRICS}
              for v in (0.1, 1.0) for s in (0, 1, 2)}
    table = sweep_table(points, [0.1, 1.0], [0, 1, 2])
    for key in SWEEP_METRICS:
        assert table[key]["per_seed"] == [[1, 10], [2, 11], [3, 12]]
        np.testing.assert_allclose(table[key]["mean"], [2, 11])
        assert table[key]["min"] == [1, 10] and table[key]["max"] == [3, 12]
    result = {"values": [0.1, 1.0], "seeds": [0, 1, 2], "metrics": table, "mark": 0.4,
              "train": {"steps": 5}}
    fig = sweep_figure(result)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == len(SWEEP_METRICS)
    for ax in visible:
        assert ax.get_xscale() == "log"
        assert len(ax.collections) == 1  # the band over seeds
        assert any(list(line.get_xdata()) == [0.4, 0.4] for line in ax.lines)  # the mark


@pytest.mark.parametrize("content, expected", [
    ({"beta0": 0.5}, 0.5),
    ({"beta0": [0.4, 0.8]}, 0.6),
    ({"layers": [{"beta0_svi": 1.0, "beta0_minka": 3.0}, {"beta0_svi": 2, "beta0_minka": 2}]},
     2.0),
    ({"beta0_init": 9.0, "result": {"beta0": [1.0, 2.0]}, "steps": 100}, 1.5),
])
def test_marks_are_read_leniently(tmp_path, content, expected):
    path = tmp_path / "eb.json"
    path.write_text(json.dumps(content))
    assert read_beta0_mark(path) == pytest.approx(expected)


@pytest.mark.parametrize("content", ['{"steps": 3}', '{"beta0": -1}', "not json"])
def test_bad_marks_are_rejected(tmp_path, content):
    path = tmp_path / "eb.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="mark"):
        read_beta0_mark(path)


def test_parallel_points_in_spawned_workers(corpus, tmp_path):
    model_cfg, train_cfg = configs(corpus, steps=3, eval_every=3, checkpoint_every=3)
    mark = tmp_path / "eb.json"
    mark.write_text(json.dumps({"beta0": [0.3, 0.5]}))
    result = sweep_beta0([0.2, 5.0], [0], tmp_path / "sweep", model_cfg, train_cfg, jobs=2,
                         progress=False, mark=mark, eval_batches=1)
    assert result["mark"] == pytest.approx(0.4)
    for value in (0.2, 5.0):
        run = point_dir(tmp_path / "sweep", value, 0)
        assert (run / "metrics.json").is_file() and (run / "sweep_point.json").is_file()
        assert json.loads((run / "config.json").read_text())["train"]["beta0"] == value
    assert "0.4" in (tmp_path / "sweep" / "report.md").read_text()
