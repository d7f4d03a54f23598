"""The markdown of the analysis reports (:mod:`bayes_router.experiments.report`)."""

from __future__ import annotations

import math
from pathlib import Path

from bayes_router.analysis.calibration_bootstrap import CALIBRATION_BINS, CALIBRATION_METRICS


def plug_in_label(router: str) -> str:
    """What the plug-in predictive routes with: the posterior mean, or a deterministic
    router's own weights."""
    return ("plug-in (posterior mean)" if router == "bayesian"
            else "plug-in (softmax weights)" if router == "prior-free"
            else "plug-in (the router's weights)")



def _ci(entry: dict, digits: int = 4) -> str:
    return (f"{entry['value']:.{digits}f} [{entry['low']:.{digits}f}, "
            f"{entry['high']:.{digits}f}]")



def _num(value, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


# markdown
def run_line(result: dict) -> str:
    c = result.get("calibration", result)
    samples = f", BMA over {result['num_samples']} routing samples" if result["num_samples"] \
        else ""
    return (f"Run `{result['run_dir']}`, {result['split']} split, {c['n_tokens']} tokens in "
            f"{c['n_windows']} windows{samples}. Intervals: 95 % percentile bootstrap over "
            f"windows ({c['n_boot']} resamples).")


# ------------------------------------------------------------------------------------------------
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



def _ci_or_value(entry: dict, digits: int = 4) -> str:
    if entry.get("low") is None:
        return f"{entry['value']:.{digits}f}"
    return _ci(entry, digits)


def further_calibration_table(result: dict) -> list[str]:
    """Markdown lines of the smooth ECE, class-wise ECE and debiased squared calibration error."""
    c = result.get("calibration", result)
    names = {"plug_in": plug_in_label(result.get("router", c.get("router", ""))),
             "bma": "Bayesian model average"}
    lines = ["| predictive | smooth ECE | bandwidth σ | class-wise ECE | debiased squared CE "
             f"({CALIBRATION_BINS} equal-mass bins) |", "|---|---|---|---|---|"]
    for key, p in c["predictives"].items():
        lines.append(f"| {names[key]} | {_ci(p['smooth_ece'])} | "
                     f"{p['smooth_ece']['bandwidth']:.4f} | {_ci_or_value(p['classwise_ece'], 5)}"
                     f" | {_ci(p['debiased_squared_ce'], 5)} |")
    lines += ["", "Smooth ECE: Błasiok & Nakkiran (2023), Gaussian kernel reflected at 0 and 1, "
              "bandwidth solving smECE(σ) = σ as in `relplot`. Class-wise ECE: Kull et al. "
              f"(2019), {CALIBRATION_BINS} equal-width bins per class, averaged over all classes. "
              "Debiased squared CE: Kumar, Liang & Ma (2019), top label; it can be negative, "
              "and its square root is the l2 calibration error."]
    return lines


def selective_section(selective: dict, figure: str) -> list[str]:
    """Markdown lines of the selective-prediction comparison (AURC of each score)."""
    reference = selective["reference"]
    losses = selective["losses"]
    lines = ["## Selective prediction", "",
             "Dropping the tokens with the highest score first: area under the risk-coverage "
             "curve (AURC, lower is better; Geifman & El-Yaniv 2017, Geifman et al. 2019) of the "
             "plug-in predictive's error (1 − top-1 accuracy) and NLL, and the paired difference "
             f"to `{reference}` (negative: the score ranks better). Ties in a score count "
             "as a random order (each tied token gets the tie group's mean loss).", "",
             "| score | " + " | ".join(f"AURC {loss} | − reference | E-AURC {loss}"
                                       for loss in losses) + " |",
             "|---" * (1 + 3 * len(losses)) + "|"]
    for name in next(iter(losses.values()))["scores"]:
        cells = []
        for entry in losses.values():
            e = entry["scores"][name]
            cells += [_ci(e["aurc"]), "—" if name == reference else _ci(e["minus_reference"]),
                      f"{e['e_aurc']:.4f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Overall risk (the AURC of a constant score) and the oracle's AURC (ranking by "
              "the loss itself): " + "; ".join(
                  f"{loss} {e['overall']:.4f} and {e['oracle_aurc']:.4f}"
                  for loss, e in losses.items()) + ".", ""]
    for loss, verdict in selective["verdict"].items():
        beat = verdict["beat_reference"]
        best = verdict["best_routing_measure"]
        delta = losses[loss]["scores"][best]["minus_reference"]
        lines.append(
            f"- {loss}: " + (f"{', '.join(f'`{b}`' for b in beat)} beat"
                             f"{'s' if len(beat) == 1 else ''} the predictive entropy "
                             "(interval of the difference below 0)." if beat else
                             "no routing measure beats the predictive entropy") +
            ("" if beat else f"; the best, `{best}`, differs by {_ci(delta)}."))
    lines += ["", f"![risk-coverage]({figure})"]
    return lines


def decision_section(rows: list[dict], experts, figure: str | None) -> list[str]:
    """Markdown of the routing decisions' calibration against the oracle, per layer."""
    confidences = list(rows[0]["confidence"])
    measures = list(rows[0]["auroc_wrong"])
    lines = ["## Calibration of the routing decisions against the oracle", "",
             "A decision is right when the argmax expert is the one the oracle label names "
             "(targets labelled 'any' are left out). Confidence: the argmax weight"
             + (" and the posterior probability that the argmax is the largest weight"
                if "argmax_probability" in confidences else "")
             + "; ECE over 10 equal-width bins. AUROC: how well each uncertainty measure picks "
             "out the wrong decisions (0.5 is chance, the random score shows the noise).", "",
             "| layer | tokens | right | "
             + " | ".join(f"{c.replace('_', ' ')}: mean / ECE" for c in confidences)
             + " | " + " | ".join(f"AUROC {m}" for m in measures) + " | AUROC random |",
             "|---|---|---|" + "---|" * (len(confidences) + len(measures) + 1)]
    for row in rows:
        lines.append(
            f"| {row['layer']} | {row['n_tokens']} | {100 * row['accuracy']:.1f} % | "
            + " | ".join(f"{row['confidence'][c]['mean']:.3f} / {row['confidence'][c]['ece']:.3f}"
                         for c in confidences)
            + " | " + " | ".join(_num(row["auroc_wrong"][m]) for m in measures)
            + f" | {_num(row['auroc_wrong_random'])} |")
    lines += ["", "Right expert per layer: " + "; ".join(
        f"layer {row['layer']} " + ", ".join(f"{e} {100 * v:.0f} %" for e, v in
                                             zip(experts, row["best_share"], strict=True))
        for row in rows) + "."]
    if figure:
        lines += ["", f"![routing decisions]({figure})"]
    return lines


def analysis_report(result: dict) -> str:
    """The markdown report of :func:`analyse_run`."""
    f = result["figures"]
    lines = [f"# Analysis: {result['router']} router", "", run_line(result), "",
             "## Predictive calibration", "", *calibration_table(result), "",
             f"![reliability]({f['reliability']})", "", *further_calibration_table(result), "",
             f"![smooth reliability]({f['smooth_reliability']})", "",
             "## Routing uncertainty", "",
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
    if result.get("selective_prediction"):
        lines += ["", *selective_section(result["selective_prediction"], f["risk_coverage"])]
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
    if result.get("decision_calibration"):
        lines += ["", *decision_section(result["decision_calibration"], result["experts"],
                                        f.get("decisions"))]
    if result.get("oracle_labels"):
        lines += ["", "## Prediction quality per oracle label (plug-in predictive)", "",
                  "| label | share of targets | NLL (nats) | accuracy |", "|---|---|---|---|"]
        for name, e in result["oracle_labels"].items():
            lines.append(f"| {name} | {100 * e['share']:.1f} % | {e['nll']:.3f} | "
                         f"{100 * e['accuracy']:.1f} % |")
    lines.append("")
    return "\n".join(lines)


def comparison_report(run_dirs, results: list[dict], figure: str) -> str:
    """``comparison.md`` of :func:`~bayes_router.experiments.report.analyse_runs`."""
    lines = ["# Calibration comparison", "",
             "| run | predictive | ECE | ECE (equal-mass) | MCE | Brier | NLL | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for d, r in zip(run_dirs, results, strict=True):
        for key, p in r["calibration"]["predictives"].items():
            lines.append(f"| {Path(d).name} | {key} | " + " | ".join(
                _ci(p[m]) for m in CALIBRATION_METRICS) + f" | {p['accuracy']:.3f} |")
    lines += ["", f"![reliability]({figure})", ""]
    return "\n".join(lines)
