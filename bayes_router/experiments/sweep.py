"""Sensitivity to the prior concentration: a grid of ``beta0`` values x seeds of Bayesian runs.

Each point ``(beta0, seed)`` is an ordinary run directory ``OUT/beta0=<v>/seed<s>`` trained by
:func:`~bayes_router.experiments.training_runs.train_run`, plus ``sweep_point.json`` with the
numbers the sweep reports: validation NLL under soft and hard routing, projected FLOP cost,
routing entropy (from the run's ``metrics.json``), and the ECE of the plug-in predictive and the
mean mutual information (epistemic routing uncertainty) over layers and tokens (computed here on
the same validation windows). A point is finished when both files exist, so an interrupted sweep
resumes where it stopped; a point interrupted mid-training resumes from its checkpoint. Points
are independent and run in parallel processes with ``jobs > 1``.

The sweep writes ``sweep.json``, ``sweep_beta0.png`` (one panel per metric against ``beta0`` on
a log axis, the mean over seeds and a band from the lowest to the highest seed) and
``report.md``. An empirical-Bayes estimate of ``beta0`` can be marked on every panel.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyro
import torch
from matplotlib.figure import Figure

from bayes_router.analysis import expected_calibration_error, plot_beta0_sensitivity
from bayes_router.core.dirichlet import epistemic_uncertainty
from bayes_router.core.validation import check_int
from bayes_router.experiments.json_files import read_json, versions, write_json
from bayes_router.experiments.run_loading import load_data, load_run_dir
from bayes_router.experiments.rundir import run_lock
from bayes_router.experiments.training_runs import read_finished_metrics, train_runs
from bayes_router.inference.evaluate import collect_batch_outputs
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.config import TinyLMConfig

logger = logging.getLogger(__name__)

POINT_FILE = "sweep_point.json"

#: The reported metrics: key -> axis label.
SWEEP_METRICS = {
    "val_nll_soft": "val NLL, soft routing (nats)",
    "val_nll_hard": "val NLL, hard routing (nats)",
    "projected_flop_cost": "projected FLOP cost (%)",
    "routing_entropy": "routing entropy (%)",
    "ece": "ECE of the plug-in predictive",
    "mutual_information": "mean mutual information (nats)",
}


def point_dir(out_dir: Path, beta0: float, seed: int) -> Path:
    """``OUT/beta0=<v>/seed<s>`` with ``v`` in the shortest ``%g`` form (``beta0=0.1``)."""
    return Path(out_dir) / f"beta0={beta0:g}" / f"seed{seed}"


def check_values(values) -> list[float]:
    """The sweep values as floats; each must be finite and > 0, and none may repeat."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values: the sweep needs at least one beta0 value")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"values: every beta0 must be a finite number > 0, got {bad}")
    if len({f"{v:g}" for v in values}) != len(values):
        raise ValueError(f"values must not repeat a beta0, got {values}")
    return values


def _check_seeds(seeds) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1 (a count) or a list of seeds, got {seeds}")
        return list(range(seeds))
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct seeds, got {seeds}")
    return seeds


def read_beta0_mark(path: Path) -> float:
    """An empirical-Bayes ``beta0`` from a JSON file: the mean of every number found under a key
    containing ``"beta0"`` (at any depth, in lists too), e.g. ``{"beta0": 0.7}``,
    ``{"beta0": [0.6, 0.8]}`` or ``{"layers": [{"beta0_svi": 0.6, "beta0_minka": 0.7}]}``.
    Keys containing ``"init"`` (a starting value such as ``beta0_init``) are skipped.

    :raises ValueError: if the file holds no such number or their mean is not > 0.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"mark: cannot read a JSON file at {path}: {error}") from error
    found: list[float] = []

    def walk(node, under_beta0: bool) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                key = str(key).lower()
                if "init" not in key:
                    walk(value, under_beta0 or "beta0" in key)
        elif isinstance(node, list):
            for item in node:
                walk(item, under_beta0)
        elif under_beta0 and isinstance(node, int | float) and not isinstance(node, bool):
            found.append(float(node))

    walk(data, False)
    if not found:
        raise ValueError(f"mark: {path} holds no number under a key containing 'beta0'")
    mark = float(np.mean(found))
    if not (math.isfinite(mark) and mark > 0):
        raise ValueError(f"mark: the beta0 values in {path} must be > 0, got {found}")
    return mark


# ------------------------------------------------------------------------------------------------
# one point


@torch.no_grad()
def evaluate_point(run_dir: Path, eval_batches: int | None, data=None) -> dict:
    """ECE of the plug-in predictive and mean mutual information of a trained Bayesian run, plus
    the numbers of its ``metrics.json``."""
    metrics = read_json(Path(run_dir) / "metrics.json")
    with pyro.settings.context(module_local_params=True):
        model, model_cfg, train_cfg, _, run_data = load_run_dir(run_dir)
        data = run_data if data is None else data
        arrays = collect_batch_outputs(model, data, "val", train_cfg.seq_len, mode="soft",
                                       max_batches=eval_batches)
    probs = arrays["logits"].softmax(-1)
    return {
        "beta0": train_cfg.beta0, "seed": train_cfg.seed, "steps": metrics["steps"],
        "val_nll_soft": metrics["soft"]["val_nll"], "val_nll_hard": metrics["hard"]["val_nll"],
        "projected_flop_cost": metrics["soft"]["projected_flop_cost"],
        "expected_flop_cost": metrics["soft"]["expected_flop_cost"],
        "routing_entropy": metrics["soft"]["routing_entropy"],
        "ece": expected_calibration_error(probs, arrays["targets"]),
        "mutual_information": float(epistemic_uncertainty(arrays["concentration"]).mean()),
        "train_seconds": metrics["train_seconds"],
    }


def point_finished(run_dir: Path) -> bool:
    """A point is finished when its run directory holds ``metrics.json`` and the point file."""
    return (run_dir / "metrics.json").exists() and (run_dir / POINT_FILE).exists()


# ------------------------------------------------------------------------------------------------
# the sweep


def sweep_beta0(values: Sequence[float], seeds: int | Sequence[int], out_dir: Path,
                model_cfg: TinyLMConfig, train_cfg: TrainConfig, jobs: int = 1,
                progress: bool = True, mark: Path | None = None,
                eval_batches: int | None = 8, device: str = "cpu") -> dict:
    """Train and evaluate a Bayesian run at every ``beta0`` in ``values`` for every seed.

    :param values: the ``beta0`` grid, each > 0.
    :param seeds: a number of seeds (``0 .. seeds-1``) or the seeds themselves.
    :param model_cfg: the LM of every point.
    :param train_cfg: the training of every point (``router="bayesian"``); its ``beta0`` and
        ``seed`` are replaced by the point's.
    :param jobs: parallel worker processes (spawned, one torch thread each).
    :param mark: a JSON file with an empirical-Bayes ``beta0`` to mark (see
        :func:`read_beta0_mark`).
    :param eval_batches: validation batches for every evaluation of a point.
    :param device: where every point trains.
    :raises ValueError: for a value <= 0, a non-Bayesian ``train_cfg``, ``jobs < 1``, or a
        finished point whose configuration differs from the requested one.
    """
    values = check_values(values)
    seeds = _check_seeds(seeds)
    if train_cfg.router != "bayesian":
        raise ValueError(f"train_cfg.router must be 'bayesian' for a beta0 sweep, got "
                         f"{train_cfg.router!r}")
    check_int("jobs", jobs)
    mark_value = read_beta0_mark(mark) if mark is not None else None
    out_dir = Path(out_dir)
    with run_lock(out_dir):
        return _sweep(values, seeds, out_dir, model_cfg, train_cfg, jobs, progress, mark,
                      mark_value, eval_batches, device)


def _sweep(values, seeds, out_dir, model_cfg, train_cfg, jobs, progress, mark, mark_value,
           eval_batches, device) -> dict:
    points, todo = {}, []
    for value in values:
        for seed in seeds:
            cfg = dataclasses.replace(train_cfg, beta0=value, seed=seed)
            run_dir = point_dir(out_dir, value, seed)
            read_finished_metrics(run_dir, model_cfg, cfg)  # refuses a run of another configuration
            if point_finished(run_dir):
                logger.info("reusing finished point %s", run_dir)
                points[value, seed] = read_json(run_dir / POINT_FILE)
            else:
                todo.append((value, seed, cfg, run_dir))
    data = load_data(train_cfg, model_cfg) if todo else None
    train_runs([(model_cfg, cfg, run_dir) for _, _, cfg, run_dir in todo], jobs=jobs,
               progress=progress, data=data, eval_batches=eval_batches, device=device)
    for value, seed, _, run_dir in todo:
        points[value, seed] = evaluate_point(run_dir, eval_batches, data)
        write_json(run_dir / POINT_FILE, points[value, seed])

    result = {
        "values": values, "seeds": seeds, "mark": mark_value,
        "mark_file": str(mark) if mark is not None else None,
        "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
        "metrics": sweep_table(points, values, seeds),
        "points": [{**points[v, s], "run_dir": str(point_dir(out_dir, v, s).relative_to(out_dir))}
                   for v in values for s in seeds],
        "versions": versions(),
    }
    figure = sweep_figure(result)
    figure.savefig(out_dir / "sweep_beta0.png", dpi=120)
    result["figure"] = "sweep_beta0.png"
    write_json(out_dir / "sweep.json", result)
    (out_dir / "report.md").write_text(sweep_report(result))
    return result


def sweep_table(points: dict, values: list[float], seeds: list[int]) -> dict:
    """Per metric: ``per_seed`` ``(n_seeds, n_values)`` and the mean, min and max over seeds."""
    table = {}
    for key in SWEEP_METRICS:
        grid = np.array([[points[v, s][key] for v in values] for s in seeds], dtype=float)
        table[key] = {"per_seed": grid.tolist(), "mean": grid.mean(0).tolist(),
                      "min": grid.min(0).tolist(), "max": grid.max(0).tolist()}
    return table


def sweep_figure(result: dict) -> Figure:
    """One panel per metric of :data:`SWEEP_METRICS` against ``beta0`` (log axis), the mean over
    seeds with a min-max band, and the empirical-Bayes mark if any."""
    n_cols = 3
    n_rows = math.ceil(len(SWEEP_METRICS) / n_cols)
    fig = Figure(figsize=(4.2 * n_cols, 3.3 * n_rows))
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, (key, label) in zip(axes, SWEEP_METRICS.items(), strict=False):
        plot_beta0_sensitivity(result["values"], result["metrics"][key]["per_seed"], ax=ax,
                               ylabel=label, mark=result["mark"])
        if ax.get_legend() is not None and ax is not axes[0]:
            ax.get_legend().remove()
    for ax in axes[len(SWEEP_METRICS):]:
        ax.set_visible(False)
    fig.suptitle(f"beta0 sensitivity: {len(result['seeds'])} seed(s), "
                 f"{result['train']['steps']} steps, band = range over seeds", fontsize=10)
    fig.tight_layout()
    return fig


def sweep_report(result: dict) -> str:
    """Markdown: the per-value table (mean [min, max] over seeds) and the figure."""
    t = result["metrics"]
    lines = ["# beta0 sweep", "",
             f"{len(result['values'])} values x {len(result['seeds'])} seed(s) "
             f"{result['seeds']}, {result['train']['steps']} steps each, corpus "
             f"`{result['train']['dataset']}`, estimator `{result['train']['estimator']}`, "
             f"costs preset `{result['model']['cost_preset']}`. Mean over seeds [min, max].", ""]
    if result["mark"] is not None:
        lines += [f"Empirical-Bayes beta0 marked: {result['mark']:.4g} (from "
                  f"`{result['mark_file']}`).", ""]
    lines += ["| beta0 | " + " | ".join(SWEEP_METRICS.values()) + " |",
              "|---" * (1 + len(SWEEP_METRICS)) + "|"]
    for i, value in enumerate(result["values"]):
        cells = []
        for key in SWEEP_METRICS:
            digits = 1 if key in ("projected_flop_cost", "routing_entropy") else 4
            m = t[key]
            cells.append(f"{m['mean'][i]:.{digits}f} [{m['min'][i]:.{digits}f}, "
                         f"{m['max'][i]:.{digits}f}]")
        lines.append(f"| {value:g} | " + " | ".join(cells) + " |")
    lines += ["", f"![beta0 sensitivity]({result['figure']})", ""]
    return "\n".join(lines)
