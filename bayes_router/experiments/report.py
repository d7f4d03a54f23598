"""Analysis of a trained run: predictive calibration, per-token routing uncertainty, and the damage
hard routing does.

On the validation split of a run directory (see :mod:`~bayes_router.experiments.training_runs`):

- **calibration** of the *plug-in* predictive (soft routing with the posterior-mean weights, or
  the prior-free router's softmax weights) and, for the Bayesian router, of the *Bayesian model
  average* (BMA) over ``S`` routing samples from the guide: top-label ECE with 15 equal-width and
  15 equal-mass bins, MCE, multiclass Brier score and NLL, each with a percentile-bootstrap
  interval that resamples whole windows (the tokens of one window are not independent); the
  smooth ECE with its smoothed reliability diagram, the class-wise ECE and the debiased squared
  calibration error, with intervals over the same windows;
- **routing uncertainty** per token and layer from the guide's Dirichlet concentration (total,
  aleatoric, epistemic, concentration; see :mod:`~bayes_router.core.dirichlet`); the
  prior-free router has only the entropy of its softmax weights;
- **damage** of hard routing per token, ``KL(soft predictive || hard predictive)`` on the same
  windows, and how well each uncertainty measure predicts it and the NLL
  (:func:`~bayes_router.analysis.diagnostics.uncertainty_diagnostics`);
- **selective prediction**: the risk-coverage curve and its area (AURC) when the tokens with
  the highest score are dropped first, for the error and the NLL of the plug-in predictive, for
  every routing-uncertainty measure, the predictive's own entropy and a random score, with the
  paired difference to the predictive entropy (window bootstrap);
- on synthetic tasks, the **routing accuracy** of the argmax expert against the oracle, overall
  and per uncertainty decile.

:func:`analyse_run` writes ``analysis.json``, ``tokens.npz`` (the per-token arrays), the figures
and ``report.md``; :func:`calibrate_run` only the calibration part. Both write into
``RUN_DIR/analysis`` unless told otherwise.

References:
  - *On Calibration of Modern Neural Networks*, Guo, Pleiss, Sun, Weinberger (ICML 2017)
  - *Predictive Uncertainty Estimation via Prior Networks*, Malinin, Gales (NeurIPS 2018)
  - *Smooth ECE: Principled Reliability Diagrams via Kernel Smoothing*, Błasiok, Nakkiran (2023)
  - *Selective Classification for Deep Neural Networks*, Geifman, El-Yaniv (NeurIPS 2017)
"""

from __future__ import annotations

import logging
import math
import string
from pathlib import Path

import numpy as np
import pyro
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from bayes_router.analysis import (
    plot_expert_share,
    uncertainty_diagnostics,
)
from bayes_router.analysis.calibration_bootstrap import (
    CALIBRATION_BINS,
    CALIBRATION_METRICS,
    calibration_summary,
    curve_from_dict,
    paired_difference,
)
from bayes_router.analysis.evidence import (
    argmax_probability,
    decision_calibration,
    oracle_experts,
)
from bayes_router.analysis.plots import plot_decision_reliability
from bayes_router.analysis.report_figures import (
    damage_figure,
    reliability_figure,
    risk_coverage_figure,
    simplex_figure,
    smooth_reliability_figure,
    uncertainty_strip_figure,
)
from bayes_router.analysis.selective import curve_from_points, selective_prediction_summary
from bayes_router.analysis.smooth_calibration import smooth_curve_from_dict
from bayes_router.analysis.token_statistics import (
    oracle_accuracy,
    oracle_label_quality,
    summary,
    token_uncertainty,
    uncertainty_scores,
)
from bayes_router.core.validation import check_int
from bayes_router.experiments.json_files import versions, write_json
from bayes_router.experiments.report_text import (
    analysis_report,
    calibration_table,
    comparison_report,
    further_calibration_table,
    plug_in_label,
    run_line,
)
from bayes_router.experiments.run_evaluation import EVAL_BATCHES
from bayes_router.experiments.run_loading import check_run_dir, load_run_dir
from bayes_router.inference.evaluate import TokenArrays, collect_token_arrays, routing_metrics
from bayes_router.models.bayesian import BayesianRoutedLM

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCHES = EVAL_BATCHES  # the windows behind metrics.json
EXCERPT_LEN = 80
SIMPLEX_SAMPLES = 400
PREDICTIVE_ENTROPY = "predictive_entropy (reference)"
RANDOM_SCORE = "random score"
_SYMBOLS = string.digits + string.ascii_letters + string.punctuation


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=120)
    return path.name


def _decode(data, ids) -> str:
    """One character per token: the run's vocabulary, or symbols for a synthetic task's ids."""
    if data.vocab is not None:
        return data.vocab.decode(np.asarray(ids), unknown="?")
    return "".join(_SYMBOLS[int(i) % len(_SYMBOLS)] for i in ids)


def _chosen_tokens(uncertainty: dict[str, np.ndarray], layer: int) -> list[tuple[str, int]]:
    a0 = uncertainty["concentration"][layer]
    picks = [("most evidence", int(np.argmax(a0))),
             ("median evidence", int(np.argsort(a0, kind="stable")[len(a0) // 2])),
             ("most aleatoric", int(np.argmax(uncertainty["aleatoric"][layer]))),
             ("most epistemic", int(np.argmax(uncertainty["epistemic"][layer])))]
    seen, chosen = set(), []
    for kind, index in picks:
        if index not in seen:
            seen.add(index)
            chosen.append((kind, index))
    return chosen


def _simplex_tokens(arrays: TokenArrays, uncertainty, text_of, layer: int, seed: int
                    ) -> list[dict]:
    """Dirichlet samples of the routing posteriors of the chosen tokens of ``layer``."""
    tokens = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for kind, index in _chosen_tokens(uncertainty, layer):
            concentration = torch.as_tensor(arrays.concentration[layer, index],
                                            dtype=torch.float64)
            samples = torch.distributions.Dirichlet(concentration).sample((SIMPLEX_SAMPLES,))
            tokens.append({"samples": samples.numpy(), "index": index,
                           "label": f"{kind}: {text_of(index)!r} "
                                    f"(a0={float(concentration.sum()):.2f})"})
    return tokens


# ------------------------------------------------------------------------------------------------
# run-level entry points


def _run_tokens(run_dir: Path, max_batches, n_boot, batch_size, num_samples, hard: bool,
                seed: int, progress: bool):
    """Check the options, load a finished run and make the per-token pass over its val split."""
    _check_options(max_batches, n_boot)
    run_dir = check_run_dir(run_dir)
    with pyro.settings.context(module_local_params=True):
        model, model_cfg, train_cfg, _, data = load_run_dir(run_dir)
        arrays = collect_token_arrays(model, data, "val", train_cfg.seq_len, max_batches,
                                      batch_size, num_samples, hard=hard, seed=seed,
                                      progress=progress)
    return run_dir, model, model_cfg, train_cfg, data, arrays


def _check_options(max_batches, n_boot) -> None:
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be an integer >= 1 or None, got {max_batches!r}")
    check_int("n_boot", n_boot)


def _calibration(arrays: TokenArrays, n_boot: int, seed: int, progress: bool = True) -> dict:
    T = arrays.window_len
    paired = ("ece", "brier", "nll")
    bar = tqdm(total=1 + (0 if arrays.bma_probs is None else 1 + len(paired)),
               desc=f"bootstrap ({n_boot} resamples)", disable=not progress, dynamic_ncols=True)
    result = {"n_tokens": len(arrays.targets), "n_windows": arrays.n_windows,
              "n_bins": CALIBRATION_BINS, "n_boot": n_boot, "ci_level": 0.95,
              "bootstrap_unit": "window",
              "predictives": {"plug_in": calibration_summary(arrays.probs, arrays.targets, T,
                                                             n_boot, seed)}}
    bar.update()
    if arrays.bma_probs is not None:
        result["predictives"]["bma"] = calibration_summary(arrays.bma_probs, arrays.targets, T,
                                                           n_boot, seed)
        bar.update()
        result["bma_minus_plug_in"] = {}
        for name in paired:
            result["bma_minus_plug_in"][name] = paired_difference(
                CALIBRATION_METRICS[name], arrays.probs, arrays.bma_probs, arrays.targets, T,
                n_boot, seed)
            bar.update()
    bar.close()
    return result

def _reliability_png(calibration: dict, path: Path) -> str:
    predictives = calibration["predictives"]
    labels = {"plug_in": plug_in_label(calibration.get("router", "")),
              "bma": "Bayesian model average"}
    curves = {labels[k]: curve_from_dict(v["reliability"]["equal-width"])
              for k, v in predictives.items()}
    ece = {labels[k]: v["ece"]["value"] for k, v in predictives.items()}
    return _save(reliability_figure(curves, ece), path)


def _smooth_reliability_png(calibration: dict, path: Path) -> str:
    labels = {"plug_in": plug_in_label(calibration.get("router", "")),
              "bma": "Bayesian model average"}
    curves = {labels[k]: smooth_curve_from_dict({**v["smooth_ece"],
                                                 "curve": v["smooth_reliability"]})
              for k, v in calibration["predictives"].items()}
    return _save(smooth_reliability_figure(curves), path)


def _selective_prediction(arrays: TokenArrays, scores: dict[str, np.ndarray], n_boot: int,
                          seed: int) -> dict:
    """AURC of the routing measures (mean over layers), the predictive entropy and a random
    score, for the error and the NLL of the plug-in predictive, and which routing measures
    beat the predictive entropy (paired interval below 0)."""
    ranked = {name: values for name, values in scores.items() if "/" not in name}
    ranked[RANDOM_SCORE] = np.random.default_rng(seed).random(len(arrays.targets))
    losses = {"error": (arrays.probs.argmax(-1) != arrays.targets).astype(np.float64),
              "nll": arrays.nll.astype(np.float64)}
    by_loss = selective_prediction_summary(ranked, losses, arrays.window_len,
                                           PREDICTIVE_ENTROPY, n_boot, seed=seed)
    routing = [name for name in ranked if name not in (PREDICTIVE_ENTROPY, RANDOM_SCORE)]
    verdict = {}
    for loss, entry in by_loss.items():
        best = min(routing, key=lambda name: entry["scores"][name]["aurc"]["value"])
        verdict[loss] = {
            "best_routing_measure": best,
            "beat_reference": [name for name in routing
                               if entry["scores"][name]["minus_reference"]["high"] < 0]}
    return {"reference": PREDICTIVE_ENTROPY, "predictive": "plug_in", "n_boot": n_boot,
            "bootstrap_unit": "window", "losses": by_loss, "verdict": verdict}


def _risk_coverage_png(selective: dict, path: Path) -> str:
    curves = {loss: {name: curve_from_points(e["curve"]) for name, e in entry["scores"].items()}
              for loss, entry in selective["losses"].items()}
    oracle = {loss: curve_from_points(entry["oracle_curve"])
              for loss, entry in selective["losses"].items()}
    return _save(risk_coverage_figure(curves, oracle, selective["reference"]), path)


def calibrate_run(run_dir: Path, out_dir: Path | None = None,
                  max_batches: int | None = DEFAULT_MAX_BATCHES, num_samples: int = 8,
                  n_boot: int = 1000, batch_size: int = 16, seed: int = 0,
                  progress: bool = True) -> dict:
    """The calibration part of :func:`analyse_run`: writes ``calibration.json``,
    ``reliability.png`` and ``calibration.md`` into ``out_dir`` (default ``RUN_DIR/analysis``).

    :raises ValueError: if ``run_dir`` is not a finished run directory.
    """
    run_dir, model, model_cfg, train_cfg, data, arrays = _run_tokens(
        run_dir, max_batches, n_boot, batch_size, num_samples, False, seed, progress)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"run_dir": str(run_dir), "router": train_cfg.router, "split": "val",
              "num_samples": num_samples if isinstance(model, BayesianRoutedLM) else None,
              **_calibration(arrays, n_boot, seed, progress), "versions": versions()}
    result["figures"] = {
        "reliability": _reliability_png(result, out_dir / "reliability.png"),
        "smooth_reliability": _smooth_reliability_png(result, out_dir / "smooth_reliability.png")}
    write_json(out_dir / "calibration.json", result)
    (out_dir / "calibration.md").write_text(
        "\n".join([f"# Calibration: {train_cfg.router} router", "", run_line(result), "",
                   *calibration_table(result), "", "![reliability](reliability.png)", "",
                   *further_calibration_table(result), "",
                   "![smooth reliability](smooth_reliability.png)", ""]))
    return result


def analyse_run(run_dir: Path, out_dir: Path | None = None,
                max_batches: int | None = DEFAULT_MAX_BATCHES, num_samples: int = 8,
                n_boot: int = 1000, batch_size: int = 16, seed: int = 0,
                progress: bool = True) -> dict:
    """Calibration, routing uncertainty, damage of hard routing and their diagnostics on the
    validation split of a run; writes ``analysis.json``, ``tokens.npz``, the figures and
    ``report.md`` into ``out_dir`` (default ``RUN_DIR/analysis``).

    :param max_batches: analyse at most this many batches of ``batch_size`` windows.
    :param num_samples: routing samples of the Bayesian model average.
    :param n_boot: bootstrap resamples (of windows) for the calibration intervals.
    :raises ValueError: if ``run_dir`` is not a finished run directory.
    """
    run_dir, model, model_cfg, train_cfg, data, arrays = _run_tokens(
        run_dir, max_batches, n_boot, batch_size, num_samples, True, seed, progress)
    with pyro.settings.context(module_local_params=True):
        bayesian = isinstance(model, BayesianRoutedLM)
        prior_mean = None
        if bayesian:
            prior = model.prior_concentration().detach().double()
            prior_mean = (prior / prior.sum(-1, keepdim=True)).numpy()  # (L, K)
        costs = model.costs
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    uncertainty = token_uncertainty(arrays)
    scores = uncertainty_scores(uncertainty)
    probs = arrays.probs.astype(np.float64)
    scores[PREDICTIVE_ENTROPY] = -(probs * np.log(np.clip(probs, 1e-300, None))).sum(-1)
    result = {
        "run_dir": str(run_dir), "router": train_cfg.router, "split": "val",
        "corpus": data.name, "experts": list(model_cfg.experts), "seq_len": train_cfg.seq_len,
        "n_tokens": len(arrays.targets), "n_windows": arrays.n_windows,
        "num_samples": num_samples if bayesian else None,
        "calibration": {"router": train_cfg.router,
                        **_calibration(arrays, n_boot, seed, progress)},
        "routing": routing_metrics(torch.from_numpy(arrays.abar), costs),
        "uncertainty": {"per_layer": [{name: summary(values[layer])
                                       for name, values in uncertainty.items()}
                                      for layer in range(arrays.abar.shape[0])],
                        "prior_mean": prior_mean},
        "damage": {**summary(arrays.damage), "soft_nll": float(arrays.nll.mean()),
                   "hard_nll": float(arrays.hard_nll.mean())},
        "diagnostics": uncertainty_diagnostics(scores, arrays.nll, arrays.damage, seed=seed),
        "selective_prediction": _selective_prediction(arrays, scores, n_boot, seed),
        "routing_accuracy": None,
        "versions": versions(),
    }
    if arrays.oracle is not None and (arrays.oracle != -1).any():
        result["routing_accuracy"] = oracle_accuracy(arrays.abar, arrays.oracle,
                                                     uncertainty["total"], model_cfg.experts)
        result["oracle_labels"] = oracle_label_quality(arrays.probs, arrays.targets, arrays.nll,
                                                       arrays.oracle)
        result["decision_calibration"] = _decision_calibration(arrays, uncertainty,
                                                               model_cfg.experts, seed)
    result["figures"] = _analysis_figures(result, arrays, uncertainty, data, prior_mean,
                                          model_cfg.experts, out_dir, seed)
    np.savez_compressed(out_dir / "tokens.npz", tokens=arrays.tokens, targets=arrays.targets,
                        nll=arrays.nll, hard_nll=arrays.hard_nll, damage=arrays.damage,
                        abar=arrays.abar, window_len=arrays.window_len,
                        **{f"uncertainty_{k}": v for k, v in uncertainty.items()})
    write_json(out_dir / "analysis.json", result)
    (out_dir / "report.md").write_text(analysis_report(result))
    return result


#: Draws per token of the posterior probability that the argmax weight is the largest.
ARGMAX_DRAWS = 400


def _decision_calibration(arrays: TokenArrays, uncertainty: dict, experts,
                          seed: int) -> list[dict] | None:
    """Per layer the calibration of the routing decisions against the oracle's expert
    (:func:`~bayes_router.analysis.evidence.decision_calibration`), where a label names an
    expert of the model."""
    best = oracle_experts(arrays.oracle, experts)
    labelled = best >= 0
    if not labelled.any():
        return None
    rows = []
    for layer in range(arrays.abar.shape[0]):
        scores = {("low concentration" if name == "concentration" else name):
                  (-values[layer] if name == "concentration" else values[layer])[labelled]
                  for name, values in uncertainty.items()}
        probability = (None if arrays.concentration is None else argmax_probability(
            arrays.concentration[layer][labelled], draws=ARGMAX_DRAWS, seed=seed))
        rows.append({"layer": layer, **decision_calibration(
            best[labelled], arrays.abar[layer][labelled], scores, probability, seed=seed)})
    return rows


def _decision_png(rows: list[dict], path: Path) -> str:
    fig = Figure(figsize=(4.2 * len(rows), 3.8))
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    for ax, row in zip(axes, rows, strict=True):
        plot_decision_reliability(row, ax=ax, reference="the oracle's expert",
                                  title=f"layer {row['layer']}: routing decisions")
    fig.tight_layout()
    return _save(fig, path)


def _analysis_figures(result, arrays, uncertainty, data, prior_mean, experts, out_dir: Path,
                      seed: int) -> dict:
    figures = {"reliability": _reliability_png(result["calibration"], out_dir / "reliability.png"),
               "smooth_reliability": _smooth_reliability_png(result["calibration"],
                                                             out_dir / "smooth_reliability.png"),
               "risk_coverage": _risk_coverage_png(result["selective_prediction"],
                                                   out_dir / "risk_coverage.png")}
    length = min(EXCERPT_LEN, arrays.window_len)
    text = _decode(data, arrays.tokens[:length])
    strip = {"total routing uncertainty H(abar) (nats)": uncertainty["total"][:, :length]}
    if "epistemic" in uncertainty:
        strip["epistemic (mutual information, nats)"] = uncertainty["epistemic"][:, :length]
    limits = (0.0, math.log(len(experts)))  # an absolute scale, comparable across runs
    figures["uncertainty_strip"] = _save(uncertainty_strip_figure(text, strip, limits),
                                         out_dir / "uncertainty_strip.png")
    if len(experts) == 3:
        figures["routing_simplex"] = _simplex_png(arrays, uncertainty, data, prior_mean, experts,
                                                  out_dir / "routing_simplex.png", seed)
    fig = Figure(figsize=(4.2, 3.4))
    plot_expert_share(abar=arrays.abar, ax=fig.subplots(), expert_names=experts)
    fig.tight_layout()
    figures["expert_share"] = _save(fig, out_dir / "expert_share.png")
    figures["uncertainty_vs_damage"] = _save(damage_figure(uncertainty, arrays.damage),
                                             out_dir / "uncertainty_vs_damage.png")
    if result.get("decision_calibration"):
        figures["decisions"] = _decision_png(result["decision_calibration"],
                                             out_dir / "decisions.png")
    return figures


def _simplex_png(arrays, uncertainty, data, prior_mean, experts, path: Path, seed: int) -> str:
    def text_of(index: int) -> str:  # the token with up to 6 tokens of its window before it
        start = max(index - 6, index - index % arrays.window_len)
        return _decode(data, arrays.tokens[start:index + 1])

    panels = []
    for layer in range(arrays.abar.shape[0]):
        if arrays.concentration is not None:
            panels.append({"title": f"layer {layer}: routing posteriors of chosen tokens",
                           "points": _simplex_tokens(arrays, uncertainty, text_of, layer, seed),
                           "prior_mean": prior_mean[layer]})
        else:
            rng = np.random.default_rng(seed)
            n = min(SIMPLEX_SAMPLES, arrays.abar.shape[1])
            rows = rng.choice(arrays.abar.shape[1], n, replace=False)
            panels.append({"title": f"layer {layer}: prior-free softmax weights",
                           "points": [{"samples": arrays.abar[layer, rows],
                                       "label": f"{n} random tokens"}],
                           "prior_mean": None})
    return _save(simplex_figure(panels, expert_names=experts), path)


def analyse_runs(run_dirs, out_dir: Path | None = None, **options) -> list[dict]:
    """:func:`analyse_run` on each run (into ``RUN_DIR/analysis``); with ``out_dir``, also a side
    by side comparison: ``comparison.json``, ``reliability_comparison.png``, ``comparison.md``.

    :param options: passed to :func:`analyse_run` (``max_batches``, ``num_samples``, ...).
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("run_dirs is empty: nothing to report")
    for run_dir in run_dirs:
        check_run_dir(run_dir)  # fail before spending minutes on the first runs
    results = [analyse_run(run_dir, **options) for run_dir in run_dirs]
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        curves, ece = {}, {}
        for run_dir, result in zip(run_dirs, results, strict=True):
            for key, predictive in result["calibration"]["predictives"].items():
                name = f"{run_dir.name}: {'BMA' if key == 'bma' else 'plug-in'}"
                curves[name] = curve_from_dict(predictive["reliability"]["equal-width"])
                ece[name] = predictive["ece"]["value"]
        figure = _save(reliability_figure(curves, ece), out_dir / "reliability_comparison.png")
        comparison = {"runs": [str(d) for d in run_dirs], "figure": figure,
                      "calibration": {d.name: r["calibration"]["predictives"]
                                      for d, r in zip(run_dirs, results, strict=True)}}
        write_json(out_dir / "comparison.json", comparison)
        (out_dir / "comparison.md").write_text(comparison_report(run_dirs, results, figure))
    return results

