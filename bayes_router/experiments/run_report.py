"""The markdown and figures of a run directory: ``report.md`` and ``training.png`` after
training, ``evaluation_<tag>.md`` and ``expert_share_<tag>.png`` after an evaluation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bayes_router.analysis.plots import plot_expert_share
from bayes_router.analysis.study_plots import (
    plot_training_loss,
    plot_training_terms,
    plot_validation,
    save_figure,
)
from bayes_router.inference.evaluate import bits_label


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def oracle_table(oracle: dict) -> list[str]:
    """Markdown rows of :func:`~bayes_router.inference.evaluate.oracle_metrics`."""
    layers = max((len(e["agreement"]) for e in oracle.values() if e.get("agreement")),
                 default=0)
    lines = ["| oracle label | share of targets | NLL (nats) | accuracy | "
             + " | ".join(f"routing agreement layer {i}" for i in range(layers)) + " |",
             "|---|---|---|---|" + "---|" * layers]
    for name, e in oracle.items():
        agreement = e.get("agreement")
        cells = ([f"{100 * a:.1f} %" for a in agreement] if agreement
                 else ["—"] * layers)
        lines.append(f"| {name} | {100 * e['share']:.1f} % | {e['nll']:.3f} | "
                     f"{100 * e['accuracy']:.1f} % | " + " | ".join(cells) + " |")
    return lines


def decode_sentence(timing: dict) -> str:
    """The timed decoding step of a run's ``timing`` metrics, one sentence ('' if untimed)."""
    if timing.get("decode_time_ratio") is None:
        return ""
    return (f" A decoding step at context {timing['decode_context']} (batch "
            f"{timing['decode_batch']}, {timing['decode_steps']} teacher-forced steps per timed "
            f"call): {timing['decode_step_ms']:.2f} ms vs "
            f"{timing['decode_full_only_step_ms']:.2f} ms {timing['decode_reference']}-only "
            f"(ratio {timing['decode_time_ratio']:.2f}).")


def run_report_markdown(config: dict, metrics: dict, evaluations: list[dict] | None = None
                        ) -> str:
    """A short markdown report of one run (``evaluations``: its periodic validations, whose
    size the report relates to the final table's)."""
    bits = bits_label(metrics["soft"])
    lines = [f"# Run: {metrics['router']} router", "",
             f"Corpus `{config['corpus']}`, seed {config['seed']}, {metrics['steps']} steps "
             f"({metrics['train_seconds']:.0f} s), cost vector "
             f"{[round(c, 3) for c in metrics['costs']]}. Objective: **{config['objective']}**"
             + (f"; warm start from `{config['train']['warm_start']}`"
                if config["train"].get("warm_start") else "")
             + (f"; the LM computed in {config['train']['dtype']} under autocast (training "
                f"and this table), the router in float32"
                if config["train"].get("dtype", "float32") != "float32" else "") + ".", "",
             f"| routing | val NLL (nats) | val {bits} | projected FLOP % | expected FLOP % | "
             "routing entropy % |", "|---|---|---|---|---|---|"]
    for mode in ("soft", "hard", "gated"):
        if mode in metrics:
            m = metrics[mode]
            lines.append(f"| {mode} | {_fmt(m['val_nll'])} | {_fmt(m['val_bpc'])} | "
                         f"{_fmt(m['projected_flop_cost'], 1)} | "
                         f"{_fmt(m['expected_flop_cost'], 1)} | {_fmt(m['routing_entropy'], 1)} |")
    lines += ["", f"The table evaluates {metrics['soft']['tokens']} validation tokens. Hard rows "
              "describe the one-hot weights that ran: their expected cost equals the projected "
              "cost and their routing entropy is 0."]
    if evaluations:
        periodic = evaluations[-1]["tokens"]
        if periodic != metrics["soft"]["tokens"]:
            lines[-1] += (f" The periodic validation of the progress bar and training.png "
                          f"uses {periodic} tokens (`--eval-batches`), so its last value can "
                          f"differ from the table's.")
    if "beta0" in metrics:
        lines += ["", "Learned prior concentration beta0 (type-II ML) per layer: "
                  + ", ".join(f"{b:.4g}" for b in metrics["beta0"]) + "."]
    if "elbo" in metrics:
        e = metrics["elbo"]
        lines += ["", f"Held-out objective per token: negative ELBO {e['neg_elbo']:.4f} = NLL "
                  f"{e['nll']:.4f} (one guide sample) + KL {e['kl']:.4f} (per layer "
                  f"{', '.join(f'{v:.4f}' for v in e['kl_per_layer'])})."]
        if "information_per_layer" in e:  # evaluations written before the ELBO surgery lack it
            lines[-1] += (" Per layer the KL splits into the per-token information I(x; alpha) "
                          f"{', '.join(f'{v:.4f}' for v in e['information_per_layer'])} and the "
                          "static allocation's KL(qbar || p) "
                          f"{', '.join(f'{v:.4f}' for v in e['marginal_kl_per_layer'])} "
                          "(ELBO surgery).")
        lines.append("")
    if config.get("gradient_bias"):
        lines += [f"**Warning: biased gradients.** {config['gradient_bias']}.", ""]
    if "oracle" in metrics["soft"]:
        lines += ["", "Per oracle label (soft routing; agreement: the share of a label's targets "
                  "whose argmax routing is the expert it names):", "",
                  *oracle_table(metrics["soft"]["oracle"])]
    share = metrics["soft"]["expert_share"]
    lines += ["", "Expert share per layer (argmax of the posterior mean / softmax weights): "
              + "; ".join(f"layer {i}: " + "/".join(f"{s:.2f}" for s in row)
                          for i, row in enumerate(share)) + ".", ""]
    t = metrics["timing"]
    if t["time_ratio"] is None:
        lines.append(f"Timed hard-routed forward pass: {t['routed_seconds'] * 1e3:.1f} ms (no "
                     "full expert to compare with).")
    else:
        lines.append(f"Timed hard-routed forward pass: {t['routed_seconds'] * 1e3:.1f} ms vs "
                     f"{t['full_only_seconds'] * 1e3:.1f} ms full-only (ratio "
                     f"{t['time_ratio']:.2f}).")
    lines[-1] += decode_sentence(t)
    lines += ["", "![training](training.png)", ""]
    return "\n".join(lines)


def plot_training(history: list[dict], evaluations: list[dict], path: Path) -> None:
    """The objective and its parts (NLL, KL per layer and the KL weight, posterior-mean spread
    and mean ``a0``) and the validation bits per character of a run."""
    fig = Figure(figsize=(13, 6.4))
    axes = fig.subplots(2, 3)
    plot_training_loss(history, ax=axes[0, 0])
    ax = plot_validation(evaluations, ax=axes[0, 1])
    if evaluations:
        ax.set_ylabel(f"val {bits_label(evaluations[-1])}")
        ax.set_title(f"validation ({evaluations[-1]['tokens']} tokens per evaluation)")
    plot_training_terms(history, axes=(axes[0, 2], axes[1, 0], axes[1, 1], axes[1, 2]))
    fig.tight_layout()
    save_figure(fig, path)


def write_evaluation_report(run_dir: Path, metrics: dict, mode: str, split: str, experts,
                            tag: str) -> None:
    """``evaluation_<tag>.md`` and ``expert_share_<tag>.png`` of an evaluation's ``metrics``
    (see :func:`~bayes_router.experiments.run_evaluation.evaluate_run`) in ``run_dir``."""
    fig = Figure(figsize=(4.5, 3.2))
    ax = plot_expert_share(np.asarray(metrics["expert_share"]), ax=fig.add_subplot(),
                           expert_names=experts)
    ax.set_title(f"expert share ({mode} routing)")
    save_figure(fig, run_dir / f"expert_share_{tag}.png")
    t = metrics["timing"]
    lines = [f"# Evaluation: {mode} routing on the {split} split", "",
             "| metric | value |", "|---|---|",
             f"| {split} NLL (nats/token) | {metrics[f'{split}_nll']:.4f} |",
             f"| {split} {bits_label(metrics)} | {metrics[f'{split}_bpc']:.4f} |",
             f"| projected FLOP cost (%) | {metrics['projected_flop_cost']:.1f} |",
             f"| expected FLOP cost (%) | {metrics['expected_flop_cost']:.1f} |",
             f"| routing entropy (%) | {metrics['routing_entropy']:.1f} |"]
    if "hard_fraction" in metrics:
        lines.append(f"| tokens routed hard | {100 * metrics['hard_fraction']:.1f} % |")
    lines.append(f"| forward time / full-only | {_fmt(t['time_ratio'], 2)} |")
    if t.get("decode_time_ratio") is not None:
        lines.append(f"| decoding step / {t['decode_reference']}-only, context "
                     f"{t['decode_context']} | {_fmt(t['decode_time_ratio'], 2)} |")
    windows = f" in windows of {metrics['seq_len']}" if "seq_len" in metrics else ""
    lines += ["", f"{metrics['tokens']} tokens{windows}. ![expert share](expert_share_{tag}.png)",
              ""]
    if "oracle" in metrics:
        lines += oracle_table(metrics["oracle"]) + [""]
    (run_dir / f"evaluation_{tag}.md").write_text("\n".join(lines))
