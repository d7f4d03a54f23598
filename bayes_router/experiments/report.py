"""Analysis of a trained run: predictive calibration, per-token routing uncertainty, and the damage
hard routing does.

On the validation split of a run directory (see :mod:`~bayes_router.experiments.runs`):

- **calibration** of the *plug-in* predictive (soft routing with the posterior-mean weights, or
  the prior-free router's softmax weights) and, for the Bayesian router, of the *Bayesian model
  average* (BMA) over ``S`` routing samples from the guide: top-label ECE with 15 equal-width and
  15 equal-mass bins, MCE, multiclass Brier score and NLL, each with a percentile-bootstrap
  interval that resamples whole windows (the tokens of one window are not independent);
- **routing uncertainty** per token and layer from the guide's Dirichlet concentration (total,
  aleatoric, epistemic, concentration; see :mod:`~bayes_router.core.dirichlet`); the
  prior-free router has only the entropy of its softmax weights;
- **damage** of hard routing per token, ``KL(soft predictive || hard predictive)`` on the same
  windows, and how well each uncertainty measure predicts it and the NLL
  (:func:`~bayes_router.analysis.diagnostics.uncertainty_diagnostics`);
- on synthetic tasks, the **routing accuracy** of the argmax expert against the oracle, overall
  and per uncertainty decile.

:func:`analyse_run` writes ``analysis.json``, ``tokens.npz`` (the per-token arrays), the figures
and ``report.md``; :func:`calibrate_run` only the calibration part. Both write into
``RUN_DIR/analysis`` unless told otherwise.

References:
  - *On Calibration of Modern Neural Networks*, Guo, Pleiss, Sun, Weinberger (ICML 2017)
  - *Predictive Uncertainty Estimation via Prior Networks*, Malinin, Gales (NeurIPS 2018)
"""

from __future__ import annotations

import logging
import math
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from bayes_router.analysis import (
    ReliabilityCurve,
    kl_divergence_categorical,
    plot_expert_share,
    plot_reliability_diagram,
    plot_routing_simplex,
    plot_uncertainty_strip,
    plot_uncertainty_vs_damage,
    routing_accuracy_by_decile,
    routing_uncertainty,
    uncertainty_diagnostics,
)
from bayes_router.analysis.calibration import (
    CALIBRATION_BINS,
    CALIBRATION_METRICS,
    calibration_summary,
    curve_from_dict,
    paired_difference,
)
from bayes_router.core.dirichlet import normalised_entropy
from bayes_router.data.synthetic import ORACLE_LABEL_IDS, ORACLE_LABELS
from bayes_router.experiments.runs import (
    EVAL_BATCHES,
    check_run_dir,
    load_run,
    versions,
    write_json,
)
from bayes_router.inference.evaluate import batch_outputs, routing_metrics
from bayes_router.models.bayesian import BayesianRoutedLM

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCHES = EVAL_BATCHES  # the windows behind metrics.json
EXCERPT_LEN = 80
SIMPLEX_SAMPLES = 400
_SYMBOLS = string.digits + string.ascii_letters + string.punctuation

# ------------------------------------------------------------------------------------------------
# one pass over the split


@dataclass
class TokenArrays:
    """Per-token values of one pass over a split: ``N = W T`` tokens of ``W`` windows of ``T``.

    :ivar probs: plug-in predictive probabilities (soft routing) ``(N, V)``, float32.
    :ivar nll: plug-in per-token NLL ``(N,)`` (cross-entropy of the soft logits).
    :ivar bma_probs: Bayesian model average over routing samples ``(N, V)`` (Bayesian only).
    :ivar damage: ``KL(soft || hard)`` per token ``(N,)`` (when the hard pass ran).
    :ivar hard_nll: per-token NLL under hard routing ``(N,)`` (when the hard pass ran).
    :ivar abar: posterior-mean (or softmax) routing weights ``(L, N, K)``.
    :ivar concentration: the guide's Dirichlet concentration ``(L, N, K)`` (Bayesian only).
    :ivar oracle: oracle expert per token, ``-1`` for "any" ``(N,)`` (synthetic tasks only).
    """

    window_len: int
    tokens: np.ndarray
    targets: np.ndarray
    probs: np.ndarray
    nll: np.ndarray
    abar: np.ndarray
    bma_probs: np.ndarray | None = None
    damage: np.ndarray | None = None
    hard_nll: np.ndarray | None = None
    concentration: np.ndarray | None = None
    oracle: np.ndarray | None = None

    @property
    def n_windows(self) -> int:
        return len(self.tokens) // self.window_len


@torch.no_grad()
def collect_tokens(model, data, split: str, seq_len: int, max_batches: int | None = None,
                   batch_size: int = 16, num_samples: int = 8, hard: bool = True,
                   seed: int = 0, progress: bool = False) -> TokenArrays:
    """Run the soft, hard and (Bayesian) sampled predictives over the windows of ``split``.

    The windows are those of :func:`~bayes_router.inference.evaluate.collect` with the same
    ``batch_size`` and ``max_batches``.

    :param num_samples: routing samples of the Bayesian model average.
    :param hard: also run hard routing (for the damage).
    :param seed: seed of the routing samples (the global torch generator is restored after).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    model.eval()
    bayesian = isinstance(model, BayesianRoutedLM)
    total = -(-data.num_windows(split, seq_len) // batch_size)
    total = total if max_batches is None else min(total, max_batches)
    parts: dict[str, list] = {name: [] for name in (
        "tokens", "targets", "probs", "nll", "abar", "bma", "damage", "hard_nll",
        "concentration", "oracle")}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        batches = data.eval_batches_with_oracle(split, batch_size, seq_len, max_batches)
        for x, y, oracle in tqdm(batches, total=total, disable=not progress, desc="analysis",
                                 dynamic_ncols=True):
            soft = batch_outputs(model, x, y, mode="soft")
            logits, targets = soft["logits"], soft["targets"]  # (B T, V), (B T,)
            for name in ("tokens", "targets", "nll", "abar"):
                parts[name].append(soft[name])
            parts["probs"].append(logits.softmax(-1))
            if soft["concentration"] is not None:
                parts["concentration"].append(soft["concentration"])
            if hard:
                hard_logits = model.predict(x, mode="hard").logits
                hard_logits = hard_logits.reshape(-1, hard_logits.shape[-1])
                parts["damage"].append(kl_divergence_categorical(logits.double(),
                                                                 hard_logits.double()))
                parts["hard_nll"].append(torch.nn.functional.cross_entropy(
                    hard_logits, targets, reduction="none"))
            if bayesian:
                bma = model.sample_predict(x, num_samples)
                parts["bma"].append(bma.reshape(-1, bma.shape[-1]))
            if oracle is not None:
                parts["oracle"].append(oracle.reshape(-1))
    if not parts["tokens"]:
        raise ValueError(f"split {split!r} is too short for one window of {seq_len} tokens")

    def cat(name: str, dim: int = 0):
        return torch.cat(parts[name], dim=dim).numpy() if parts[name] else None

    return TokenArrays(window_len=seq_len, tokens=cat("tokens"), targets=cat("targets"),
                       probs=cat("probs"), nll=cat("nll"), abar=cat("abar", 1),
                       bma_probs=cat("bma"), damage=cat("damage"), hard_nll=cat("hard_nll"),
                       concentration=cat("concentration", 1), oracle=cat("oracle"))


# ------------------------------------------------------------------------------------------------
# the numbers


def token_uncertainty(arrays: TokenArrays) -> dict[str, np.ndarray]:
    """Per-layer, per-token routing uncertainty ``(L, N)``: ``total``, ``aleatoric``,
    ``epistemic`` (nats) and ``concentration`` ``a0`` from the guide, or for the prior-free
    router the ``total`` entropy of its softmax weights only."""
    if arrays.concentration is not None:
        parts = routing_uncertainty(arrays.concentration)
        return {"total": parts.total, "aleatoric": parts.aleatoric,
                "epistemic": parts.epistemic, "concentration": parts.concentration}
    n_experts = arrays.abar.shape[-1]
    entropy = normalised_entropy(torch.from_numpy(arrays.abar).double()) * math.log(n_experts)
    return {"total": entropy.numpy()}


def uncertainty_scores(uncertainty: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-token scores (higher = more uncertain) for the diagnostics: each measure averaged over
    layers and per layer (``"<measure>/layer<l>"``); the concentration enters as ``-log a0``."""
    scores = {}
    for name, values in uncertainty.items():
        if name == "concentration":
            name, values = "neg_log_concentration", -np.log(values)
        scores[name] = values.mean(0)
        for layer, row in enumerate(values):
            scores[f"{name}/layer{layer}"] = row
    return scores


def _expert_oracle_ids(expert_names) -> np.ndarray:
    """Oracle label id of each of the model's experts (an id no oracle uses when unknown)."""
    return np.array([ORACLE_LABELS.index(name) if name in ORACLE_LABELS
                     else len(ORACLE_LABELS) + k for k, name in enumerate(expert_names)])


def oracle_accuracy(abar: np.ndarray, oracle: np.ndarray, total: np.ndarray,
                    expert_names) -> list[dict]:
    """Per layer: accuracy of the argmax expert against the oracle, overall and per decile of
    total routing uncertainty (``routing_accuracy_by_decile``)."""
    ids = _expert_oracle_ids(expert_names)
    rows = []
    for layer in range(abar.shape[0]):
        result = routing_accuracy_by_decile(ids[abar[layer].argmax(-1)], oracle, total[layer])
        rows.append({"layer": layer, **result})
    return rows


def oracle_label_quality(probs: np.ndarray, targets: np.ndarray, nll: np.ndarray,
                         oracle: np.ndarray) -> dict:
    """Per oracle label (and ``"any"``): the share of targets, their mean NLL and the argmax
    accuracy of the plug-in predictive."""
    correct = probs.argmax(-1) == targets
    result = {}
    for name, label in ORACLE_LABEL_IDS.items():
        mask = oracle == label
        if mask.any():
            result[name] = {"share": float(mask.mean()), "tokens": int(mask.sum()),
                            "nll": float(nll[mask].mean()),
                            "accuracy": float(correct[mask].mean())}
    return result


def _summary(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p90": float(np.quantile(values, 0.9)), "max": float(values.max())}


# ------------------------------------------------------------------------------------------------
# figures


def reliability_figure(curves: dict[str, ReliabilityCurve], ece: dict[str, float] | None = None
                       ) -> Figure:
    """One reliability diagram per predictive (e.g. plug-in and BMA), side by side, in rows of
    at most three (with six, two runs' plug-in and BMA diagrams sit in pairs)."""
    if not curves:
        raise ValueError("curves is empty: nothing to draw")
    columns = len(curves) if len(curves) <= 3 else (2 if len(curves) % 3 and
                                                     not len(curves) % 2 else 3)
    rows = -(-len(curves) // columns)
    fig = Figure(figsize=(3.6 * columns, 3.5 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).reshape(-1)
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    for ax, (name, curve) in zip(axes, curves.items(), strict=False):
        plot_reliability_diagram(curve=curve, ax=ax)
        title = name if ece is None or name not in ece else f"{name}: ECE {ece[name]:.3f}"
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def uncertainty_strip_figure(text: str, uncertainty: dict[str, np.ndarray],
                             limits: tuple[float, float] | None = None) -> Figure:
    """A heat strip per uncertainty measure ``(L, T)`` under the characters of ``text``.

    :param limits: a common colour scale ``(low, high)`` for every strip (e.g. ``(0, log K)``,
        so that runs compare); ``None`` stretches each strip to its own range.
    """
    if not uncertainty:
        raise ValueError("uncertainty is empty: nothing to draw")
    n_layers = next(iter(uncertainty.values())).shape[0]
    fig = Figure(figsize=(max(8.0, 0.15 * len(text)), (0.9 + 0.35 * n_layers) * len(uncertainty)))
    axes = fig.subplots(len(uncertainty), 1, squeeze=False)[:, 0]
    for ax, (name, values) in zip(axes, uncertainty.items(), strict=True):
        plot_uncertainty_strip(text, values, ax=ax, colorbar=True)
        if limits is not None:
            ax.images[0].set_clim(*limits)
        ax.set_title(name, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


def simplex_figure(panels: list[dict], expert_names=("full", "linear", "local")) -> Figure:
    """Ternary plots of routing weights, one panel per entry of ``panels``: each is
    ``{"title": str, "points": [{"samples": (S, 3), "label": str}, ...], "prior_mean": (3,) or
    None}``; every point set is one scatter, the prior mean a star."""
    if not panels or not all(panel["points"] for panel in panels):
        raise ValueError("panels is empty: nothing to draw")
    fig = Figure(figsize=(5.6 * len(panels), 5.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        points = panel["points"]
        for i, token in enumerate(points):
            last = i == len(points) - 1
            plot_routing_simplex(token["samples"], ax=ax, label=token["label"],
                                 expert_names=expert_names,
                                 prior_mean=panel.get("prior_mean") if last else None)
        ax.set_title(panel["title"], fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2,
                  frameon=False)
    fig.tight_layout()
    return fig


def damage_figure(uncertainty: dict[str, np.ndarray], damage: np.ndarray) -> Figure:
    """Mean damage per uncertainty decile, one panel per measure: a line per layer and one for
    the mean over layers. The concentration is shown as ``-log a0``."""
    scores = uncertainty_scores(uncertainty)
    names = [n for n in scores if "/" not in n]
    fig = Figure(figsize=(3.4 * len(names), 3.2))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        layers = sorted(k for k in scores if k.startswith(name + "/"))
        for key in layers:
            plot_uncertainty_vs_damage(scores[key], damage, ax=ax, label=key.split("/")[1])
        plot_uncertainty_vs_damage(scores[name], damage, ax=ax, label="mean over layers")
        ax.set_xlabel(name.replace("_", " "))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


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


def _load(run_dir: Path):
    run_dir = check_run_dir(run_dir)
    model, model_cfg, train_cfg, _, data = load_run(run_dir)
    return run_dir, model, model_cfg, train_cfg, data


def _check_options(max_batches, n_boot) -> None:
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be an integer >= 1 or None, got {max_batches!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")


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


def plug_in_label(router: str) -> str:
    """What the plug-in predictive routes with: the posterior mean, or a deterministic
    router's own weights."""
    return ("plug-in (posterior mean)" if router == "bayesian"
            else "plug-in (softmax weights)" if router == "prior-free"
            else "plug-in (the router's weights)")


def _reliability_png(calibration: dict, path: Path) -> str:
    predictives = calibration["predictives"]
    labels = {"plug_in": plug_in_label(calibration.get("router", "")),
              "bma": "Bayesian model average"}
    curves = {labels[k]: curve_from_dict(v["reliability"]["equal-width"])
              for k, v in predictives.items()}
    ece = {labels[k]: v["ece"]["value"] for k, v in predictives.items()}
    return _save(reliability_figure(curves, ece), path)


def calibrate_run(run_dir: Path, out_dir: Path | None = None,
                  max_batches: int | None = DEFAULT_MAX_BATCHES, num_samples: int = 8,
                  n_boot: int = 1000, batch_size: int = 16, seed: int = 0,
                  progress: bool = True) -> dict:
    """The calibration part of :func:`analyse_run`: writes ``calibration.json``,
    ``reliability.png`` and ``calibration.md`` into ``out_dir`` (default ``RUN_DIR/analysis``).

    :raises ValueError: if ``run_dir`` is not a finished run directory.
    """
    _check_options(max_batches, n_boot)
    with pyro.settings.context(module_local_params=True):
        run_dir, model, model_cfg, train_cfg, data = _load(run_dir)
        arrays = collect_tokens(model, data, "val", train_cfg.seq_len, max_batches, batch_size,
                                num_samples, hard=False, seed=seed, progress=progress)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"run_dir": str(run_dir), "router": train_cfg.router, "split": "val",
              "num_samples": num_samples if isinstance(model, BayesianRoutedLM) else None,
              **_calibration(arrays, n_boot, seed, progress), "versions": versions()}
    result["figures"] = {"reliability": _reliability_png(result, out_dir / "reliability.png")}
    write_json(out_dir / "calibration.json", result)
    (out_dir / "calibration.md").write_text(
        "\n".join([f"# Calibration: {train_cfg.router} router", "", _run_line(result), "",
                   *calibration_table(result), "", "![reliability](reliability.png)", ""]))
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
    _check_options(max_batches, n_boot)
    with pyro.settings.context(module_local_params=True):
        run_dir, model, model_cfg, train_cfg, data = _load(run_dir)
        arrays = collect_tokens(model, data, "val", train_cfg.seq_len, max_batches, batch_size,
                                num_samples, hard=True, seed=seed, progress=progress)
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
    scores["predictive_entropy (reference)"] = -(probs * np.log(np.clip(probs, 1e-300, None))
                                                 ).sum(-1)
    result = {
        "run_dir": str(run_dir), "router": train_cfg.router, "split": "val",
        "corpus": data.name, "experts": list(model_cfg.experts), "seq_len": train_cfg.seq_len,
        "n_tokens": len(arrays.targets), "n_windows": arrays.n_windows,
        "num_samples": num_samples if bayesian else None,
        "calibration": {"router": train_cfg.router,
                        **_calibration(arrays, n_boot, seed, progress)},
        "routing": routing_metrics(torch.from_numpy(arrays.abar), costs),
        "uncertainty": {"per_layer": [{name: _summary(values[layer])
                                       for name, values in uncertainty.items()}
                                      for layer in range(arrays.abar.shape[0])],
                        "prior_mean": prior_mean},
        "damage": {**_summary(arrays.damage), "soft_nll": float(arrays.nll.mean()),
                   "hard_nll": float(arrays.hard_nll.mean())},
        "diagnostics": uncertainty_diagnostics(scores, arrays.nll, arrays.damage, seed=seed),
        "routing_accuracy": None,
        "versions": versions(),
    }
    if arrays.oracle is not None and (arrays.oracle != -1).any():
        result["routing_accuracy"] = oracle_accuracy(arrays.abar, arrays.oracle,
                                                     uncertainty["total"], model_cfg.experts)
        result["oracle_labels"] = oracle_label_quality(arrays.probs, arrays.targets, arrays.nll,
                                                       arrays.oracle)
    result["figures"] = _analysis_figures(result, arrays, uncertainty, data, prior_mean,
                                          model_cfg.experts, out_dir, seed)
    np.savez_compressed(out_dir / "tokens.npz", tokens=arrays.tokens, targets=arrays.targets,
                        nll=arrays.nll, hard_nll=arrays.hard_nll, damage=arrays.damage,
                        abar=arrays.abar, window_len=arrays.window_len,
                        **{f"uncertainty_{k}": v for k, v in uncertainty.items()})
    write_json(out_dir / "analysis.json", result)
    (out_dir / "report.md").write_text(analysis_report(result))
    return result


def _analysis_figures(result, arrays, uncertainty, data, prior_mean, experts, out_dir: Path,
                      seed: int) -> dict:
    figures = {"reliability": _reliability_png(result["calibration"], out_dir / "reliability.png")}
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


def report_runs(run_dirs, out_dir: Path | None = None, **options) -> list[dict]:
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
        lines = ["# Calibration comparison", "",
                 "| run | predictive | ECE | ECE (equal-mass) | MCE | Brier | NLL | accuracy |",
                 "|---|---|---|---|---|---|---|---|"]
        for d, r in zip(run_dirs, results, strict=True):
            for key, p in r["calibration"]["predictives"].items():
                lines.append(f"| {d.name} | {key} | " + " | ".join(
                    _ci(p[m]) for m in CALIBRATION_METRICS) + f" | {p['accuracy']:.3f} |")
        lines += ["", f"![reliability]({figure})", ""]
        (out_dir / "comparison.md").write_text("\n".join(lines))
    return results


# ------------------------------------------------------------------------------------------------
# markdown


def _ci(entry: dict, digits: int = 4) -> str:
    return (f"{entry['value']:.{digits}f} [{entry['low']:.{digits}f}, "
            f"{entry['high']:.{digits}f}]")


def _num(value, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _run_line(result: dict) -> str:
    c = result.get("calibration", result)
    samples = f", BMA over {result['num_samples']} routing samples" if result["num_samples"] \
        else ""
    return (f"Run `{result['run_dir']}`, {result['split']} split, {c['n_tokens']} tokens in "
            f"{c['n_windows']} windows{samples}. Intervals: 95 % percentile bootstrap over "
            f"windows ({c['n_boot']} resamples).")


def calibration_table(result: dict) -> list[str]:
    """Markdown lines of the calibration table (and the BMA − plug-in differences)."""
    c = result.get("calibration", result)
    lines = [f"| predictive | ECE ({CALIBRATION_BINS} bins) | ECE (equal-mass) | MCE | Brier | "
             "NLL (nats) | top-1 accuracy |", "|---|---|---|---|---|---|---|"]
    names = {"plug_in": plug_in_label(result.get("router", c.get("router", ""))),
             "bma": "Bayesian model average"}
    for key, p in c["predictives"].items():
        lines.append(f"| {names[key]} | " + " | ".join(_ci(p[m]) for m in CALIBRATION_METRICS)
                     + f" | {p['accuracy']:.3f} |")
    if "bma_minus_plug_in" in c:
        lines += ["", "BMA − plug-in (paired bootstrap): " + ", ".join(
            f"{name} {_ci(d, 5)}" for name, d in c["bma_minus_plug_in"].items()) + "."]
    return lines


def analysis_report(result: dict) -> str:
    """The markdown report of :func:`analyse_run`."""
    f = result["figures"]
    lines = [f"# Analysis: {result['router']} router", "", _run_line(result), "",
             "## Predictive calibration", "", *calibration_table(result), "",
             f"![reliability]({f['reliability']})", "", "## Routing uncertainty", "",
             "| layer | " + " | ".join(f"{n} (mean / median)" for n in
                                       result["uncertainty"]["per_layer"][0]) + " |",
             "|---" * (1 + len(result["uncertainty"]["per_layer"][0])) + "|"]
    for layer, row in enumerate(result["uncertainty"]["per_layer"]):
        lines.append(f"| {layer} | " + " | ".join(f"{v['mean']:.3f} / {v['median']:.3f}"
                                                  for v in row.values()) + " |")
    r = result["routing"]
    lines += ["", f"Projected FLOP cost {r['projected_flop_cost']:.1f} %, expected "
              f"{r['expected_flop_cost']:.1f} %, routing entropy {r['routing_entropy']:.1f} %.",
              "", "Routing uncertainty along the start of the first window (colour scale 0 to "
              "log K nats):", "", f"![uncertainty strip]({f['uncertainty_strip']})", ""]
    if "routing_simplex" in f:
        lines += [f"![routing simplex]({f['routing_simplex']})", ""]
    d = result["damage"]
    lines += [f"![expert share]({f['expert_share']})", "", "## Damage of hard routing", "",
              f"Per-token KL(soft || hard): mean {d['mean']:.4f}, median {d['median']:.4f}, "
              f"90th percentile {d['p90']:.4f}, max {d['max']:.3f} nats. Val NLL soft "
              f"{d['soft_nll']:.4f}, hard {d['hard_nll']:.4f} nats/token.", "",
              f"![uncertainty vs damage]({f['uncertainty_vs_damage']})", "",
              "Does an uncertainty measure flag the damaged tokens? AUROC for the top "
              f"{100 * result['diagnostics']['top_fraction']:.0f} % most damaged tokens, Spearman "
              "correlation with damage and with NLL:", "",
              "| measure | AUROC top damage | Spearman damage | Spearman NLL |",
              "|---|---|---|---|"]
    diagnostics = result["diagnostics"]
    rows = {**diagnostics["measures"], "random baseline": diagnostics["random_baseline"]}
    for name, row in rows.items():
        lines.append(f"| {name} | {_num(row['auroc_top_damage'])} | "
                     f"{_num(row['spearman_damage'])} | {_num(row['spearman_nll'])} |")
    if result["routing_accuracy"]:
        lines += ["", "## Routing accuracy against the oracle", "",
                  "The majority baseline is the accuracy of sending every token to the most "
                  "common oracle label: a router must beat it to have learned anything.", "",
                  "| layer | accuracy | majority baseline | labelled tokens | accuracy per "
                  "decile of total uncertainty (low → high) |", "|---|---|---|---|---|"]
        for row in result["routing_accuracy"]:
            baseline = row.get("majority_baseline")
            lines.append(f"| {row['layer']} | {row['accuracy']:.3f} | {_num(baseline)} | "
                         f"{row['n_tokens']} | "
                         + " ".join(_num(a, 2) for a in row["bin_accuracy"]) + " |")
    if result.get("oracle_labels"):
        lines += ["", "## Prediction quality per oracle label (plug-in predictive)", "",
                  "| label | share of targets | NLL (nats) | accuracy |", "|---|---|---|---|"]
        for name, e in result["oracle_labels"].items():
            lines.append(f"| {name} | {100 * e['share']:.1f} % | {e['nll']:.3f} | "
                         f"{100 * e['accuracy']:.1f} % |")
    lines.append("")
    return "\n".join(lines)
