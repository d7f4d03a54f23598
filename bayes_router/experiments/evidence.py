"""The evidence-vs-commitment diagnostic of a run directory (``bayes-router evidence``).

See :mod:`bayes_router.analysis.evidence` for the quantities; this module samples the tokens,
runs the diagnostic per layer and writes ``evidence.json``, ``evidence.png`` and ``report.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pyro
import torch
from matplotlib.figure import Figure

from bayes_router.analysis.evidence import (
    argmax_probability,
    decision_calibration,
    layer_evidence,
    oracle_experts,
    summarise_layer,
)
from bayes_router.analysis.plots import plot_decision_reliability
from bayes_router.analysis.study_plots import save_figure
from bayes_router.core.commitment import DEFAULT_LEVELS
from bayes_router.core.dirichlet import routing_uncertainty
from bayes_router.core.elbo_surgery import split_kl
from bayes_router.core.validation import check_int
from bayes_router.experiments.json_files import versions, write_json
from bayes_router.experiments.run_loading import check_run_dir, load_run_dir
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.priors import compute_aware_prior

logger = logging.getLogger(__name__)

#: The prior and guide floor a run without a guide is measured against: the default power prior.
REFERENCE_BETA0, REFERENCE_A_MIN = 1.0, 0.05
#: Tokens whose guide posteriors' mixture stands for the aggregate posterior in the KL split.
SURGERY_SUBSAMPLE = 1024


def _check(tokens: int, windows: int) -> None:
    check_int("tokens", tokens)
    check_int("windows", windows)


def evidence_run(run_dir: Path, out_dir: Path | None = None, tokens: int = 256,
                 windows: int = 16, seed: int = 0, levels=DEFAULT_LEVELS) -> dict:
    """Run the diagnostic on ``tokens`` random positions of the first ``windows`` validation
    windows of a run; writes into ``out_dir`` (default ``RUN_DIR/evidence``).

    A Bayesian run is measured against its own prior, guide floor and posterior; any other
    run against the reference power prior (``beta0 = 1``, ``pi ∝ 1/c``, ``a_min = 0.05``) with
    its current KL taken at the floor KL.
    """
    _check(tokens, windows)
    run_dir = check_run_dir(run_dir)
    out_dir = run_dir / "evidence" if out_dir is None else Path(out_dir)
    with pyro.settings.context(module_local_params=True):
        model, model_cfg, train_cfg, _, data = load_run_dir(run_dir)
        batch = next(data.eval_batches_with_oracle("val", windows, train_cfg.seq_len), None)
        if batch is None:
            raise ValueError(f"the validation split of {run_dir} is too short for one window")
        x, y, oracle = batch
        out = model.predict(x)
        weights = [r.applied_weights for r in out.routing]
        bayesian = isinstance(model, BayesianRoutedLM)
        if bayesian:
            prior = model.prior_concentration().detach().double()
            floor = model.guide_floor().detach().double()
        else:
            prior = compute_aware_prior(model.costs, REFERENCE_BETA0).double().expand(
                model_cfg.n_layers, -1)
            floor = torch.full_like(prior, REFERENCE_A_MIN)
        g = torch.Generator().manual_seed(seed)
        B, T = x.shape
        flat = torch.randperm(B * T, generator=g)[:tokens]
        positions = torch.stack([flat // T, flat % T], dim=1)
        layers = []
        for layer in range(model_cfg.n_layers):
            concentration = out.routing[layer].decision.concentration if bayesian else None
            evidence = layer_evidence(model, x, y, positions, layer, weights, concentration,
                                      prior[layer], floor[layer], levels)
            # the split of the mean KL over every token of the windows, not only the sampled
            surgery = (None if concentration is None else dataclasses.asdict(
                split_kl(concentration, prior[layer], subsample=SURGERY_SUBSAMPLE, seed=seed)))
            decisions = _decisions(evidence["gain"], weights[layer], concentration, positions,
                                   oracle, model_cfg.experts, seed)
            layers.append({"layer": layer, "prior": prior[layer].tolist(), "kl_split": surgery,
                           "decisions": decisions,
                           "floor": floor[layer].tolist(), "floor_kl": evidence["floor_kl"],
                           "kl_current_mean": float(evidence["kl_current"].mean()),
                           "summary": summarise_layer(evidence, model_cfg.experts, levels),
                           "tokens": {key: evidence[key].tolist() for key in
                                      ("gain", "kl_current", "delta_elbo")},
                           "cost": evidence["cost"].tolist()})
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"run_dir": str(run_dir), "router": train_cfg.router,
              "prior": train_cfg.prior if bayesian else "reference power prior",
              "beta0": train_cfg.beta0 if bayesian else REFERENCE_BETA0,
              "experts": list(model_cfg.experts), "levels": [str(v) for v in levels],
              "tokens": int(positions.shape[0]), "windows": int(B), "seed": seed,
              "positions": positions.tolist(), "layers": layers, "versions": versions()}
    save_figure(evidence_figure(result), out_dir / "evidence.png")
    save_figure(decision_figure(result), out_dir / "decisions.png")
    write_json(out_dir / "evidence.json", result)
    (out_dir / "report.md").write_text(evidence_report(result))
    return result


#: Top-two gains closer than this (nats) make the counterfactual-best expert a near tie.
NEAR_TIE_NATS = 0.01


def _decisions(gain: np.ndarray, weights: torch.Tensor, concentration: torch.Tensor | None,
               positions: torch.Tensor, oracle: torch.Tensor | None, experts, seed: int) -> dict:
    """Calibration of one layer's routing decisions at the sampled tokens against the
    counterfactual-best expert (and against the oracle's expert on a synthetic task)."""
    rows, cols = positions[:, 0], positions[:, 1]
    w = weights[rows, cols].detach().double().numpy()
    if concentration is None:
        entropy = -(w * np.log(np.clip(w, 1e-300, None))).sum(1)  # softmax weights are > 0
        uncertainty, probability = {"entropy": entropy}, None
    else:
        a = concentration[rows, cols].detach().double().numpy()
        u = routing_uncertainty(a)
        uncertainty = {"total": u.total, "aleatoric": u.aleatoric, "epistemic": u.epistemic,
                       "low concentration": -u.concentration}
        probability = argmax_probability(a, seed=seed)
    ordered = np.sort(gain, axis=1)
    result = {"counterfactual": decision_calibration(gain.argmax(1), w, uncertainty,
                                                     probability, seed=seed),
              "near_tie_share": float(np.mean(ordered[:, -1] - ordered[:, -2] < NEAR_TIE_NATS))}
    if oracle is not None:
        best = oracle_experts(oracle[rows, cols].numpy(), experts)
        if (best >= 0).any():
            result["oracle"] = decision_calibration(best, w, uncertainty, probability,
                                                    seed=seed)
    return result


def decision_figure(result: dict) -> Figure:
    """Per layer the reliability of the routing decisions: the share of tokens whose argmax
    expert is the counterfactual best against the router's confidence in it."""
    layers = result["layers"]
    fig = Figure(figsize=(4.2 * len(layers), 3.8))
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer in zip(axes, layers, strict=True):
        plot_decision_reliability(layer["decisions"]["counterfactual"], ax=ax,
                                  title=f"layer {layer['layer']}: routing decisions")
    fig.tight_layout()
    return fig


def evidence_figure(result: dict) -> Figure:
    """Per layer: every sampled token's one-hot gain per expert (points) beside the KL cost of
    committing to it at each level (bars)."""
    layers, experts, levels = result["layers"], result["experts"], result["levels"]
    fig = Figure(figsize=(4.6 * len(layers), 3.8))
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    rng = np.random.default_rng(0)
    styles = ["-", "--", ":"]
    for ax, layer in zip(axes, layers, strict=True):
        gain = np.asarray(layer["tokens"]["gain"])
        cost = np.asarray(layer["cost"])
        for k in range(len(experts)):
            jitter = k + rng.uniform(-0.18, 0.18, gain.shape[0])
            ax.scatter(jitter, gain[:, k], s=6, alpha=0.4, color=f"C{k}")
            for i, level in enumerate(levels):
                ax.hlines(cost[k, i], k - 0.3, k + 0.3, color="k",
                          linestyles=styles[i % len(styles)],
                          label=f"cost: {level}" if k == 0 else None)
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_xticks(range(len(experts)), experts)
        ax.set(ylabel="gain of one-hot routing (nats)",
               title=f"layer {layer['layer']}: gain vs commitment cost")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _surgery_text(layer: dict) -> str:
    split = layer.get("kl_split")
    if split is None:  # a router without a guide, or a result written before the split
        return ""
    return (f" Over all {split['n_tokens']} tokens of the windows the mean KL "
            f"{split['kl']:.4f} splits into the per-token information I(x; alpha) "
            f"{split['information']:.4f} ± {split['information_se']:.4f} and the static "
            f"allocation's KL(qbar || p) {split['marginal_kl']:.4f} nats (ELBO surgery, "
            f"mixture of {split['n_subsample']} tokens).")


def _decision_lines(layer: dict, experts) -> list[str]:
    """Markdown of one layer's decision calibration (absent from results written before it)."""
    decisions = layer.get("decisions")
    if decisions is None:
        return []
    lines = []
    for reference, entry in decisions.items():
        if not isinstance(entry, dict):
            continue
        what = ("the counterfactual-best expert" if reference == "counterfactual"
                else "the oracle's expert")
        confidence = "; ".join(f"{name.replace('_', ' ')} {c['mean']:.3f} (ECE {c['ece']:.3f})"
                               for name, c in entry["confidence"].items())
        auroc = ", ".join(f"{name} {value:.3f}" for name, value in entry["auroc_wrong"].items())
        lines += [f"Routing decisions against {what} ({entry['n_tokens']} tokens): the argmax "
                  f"is it for {100 * entry['accuracy']:.1f} % (best per expert "
                  + ", ".join(f"{e} {100 * v:.0f} %" for e, v in
                              zip(experts, entry["best_share"], strict=True))
                  + "; chosen " + ", ".join(f"{e} {100 * v:.0f} %" for e, v in
                                            zip(experts, entry["chosen_share"], strict=True))
                  + f"). Mean confidence: {confidence}. AUROC for picking out the wrong "
                  f"decisions: {auroc}; random score {entry['auroc_wrong_random']:.3f}.", ""]
    lines.append(f"{100 * decisions['near_tie_share']:.1f} % of the tokens' top two gains are "
                 f"within {NEAR_TIE_NATS} nats (a near tie for the best expert).")
    return lines


def evidence_report(result: dict) -> str:
    """The diagnostic as markdown: per layer and expert the gain and, per level, the cost and
    the shares of tokens whose gain exceeds it and whose ELBO change is positive."""
    levels = result["levels"]
    lines = [f"# Evidence vs commitment: {result['router']} run", "",
             f"Run `{result['run_dir']}`, prior: {result['prior']} (beta0 {result['beta0']}); "
             f"{result['tokens']} validation tokens from {result['windows']} windows (seed "
             f"{result['seed']}). Gain: the log-likelihood change of routing one token of one "
             "layer one-hot to the expert, all other weights as they are (summed over the later "
             "targets of its sequence). Cost: the smallest KL a guide pays to commit to the "
             "expert at a level. ELBO change: the plug-in likelihood gain at the cheapest "
             "committed guide's mean minus the KL it adds over the token's current KL.", ""]
    header = ("| expert | gain mean [q10, q90] | gain > 0 | "
              + " | ".join(f"{lv}: cost / gain > cost / ELBO rewards" for lv in levels) + " |")
    for layer in result["layers"]:
        lines += [f"## Layer {layer['layer']}", "",
                  f"Prior {[round(v, 3) for v in layer['prior']]}, guide floor "
                  f"{[round(v, 3) for v in layer['floor']]} (floor KL "
                  f"{layer['floor_kl']:.3f} nats), mean current KL "
                  f"{layer['kl_current_mean']:.3f} nats per token.{_surgery_text(layer)}", "",
                  header, "|---|---|---|" + "---|" * len(levels)]
        for name, s in layer["summary"].items():
            cells = [f"{s['levels'][lv]['cost']:.3f} / "
                     f"{100 * s['levels'][lv]['share_gain_exceeds_cost']:.1f} % / "
                     f"{100 * s['levels'][lv]['share_elbo_rewards_move']:.1f} %"
                     for lv in levels]
            lines.append(f"| {name} | {s['gain_mean']:.4f} [{s['gain_q10']:.4f}, "
                         f"{s['gain_q90']:.4f}] | {100 * s['gain_positive_share']:.1f} % | "
                         + " | ".join(cells) + " |")
        lines += ["", *_decision_lines(layer, result["experts"])]
        lines.append("")
    lines += ["![evidence](evidence.png)", "", "![routing decisions](decisions.png)", ""]
    return "\n".join(lines)
