"""The report of a gradient-variance lab run (``bayes-router variance``): its figures, its
markdown tables (the estimators' summaries, the sweeps, the particle sweep's power laws) and
``report.md``. The study itself is :mod:`bayes_router.experiments.variance_lab`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from bayes_router.analysis.study_plots import (
    plot_panels,
    plot_particle_scaling,
    plot_variance_along_training,
    plot_variance_bars,
    plot_variance_vs_beta0,
    plot_variance_vs_particles,
    save_figure,
)
from bayes_router.variance.gradient_stats import snr_noise_floor
from bayes_router.variance.lm_variance import GROUP_LABELS, GROUPS, aligned_points
from bayes_router.variance.toy_variance import BOOTSTRAPPED


def groups_of(result: dict) -> list[str]:
    return [g for g in GROUPS if any(g in e["groups"] for e in result["estimators"].values())]



def write_lab_outputs(out_dir: Path, result: dict) -> None:
    """Figures and ``report.md`` of a lab result."""
    main = result["main"]
    figures = []
    if result["mode"] == "toy":
        save_figure(plot_panels(lambda g, k, ax: plot_variance_bars(main, g, k, ax), ["a"],
                                ("total_variance", "median_snr", "efficiency"),
                                "conjugate toy: gradient w.r.t. the guide concentration a"),
                    out_dir / "toy_bars.png")
        figures.append(("toy_bars.png", "Variance, SNR and efficiency per estimator (toy)"))
        if result.get("particles"):
            keys = ("total_variance", "median_snr", "efficiency")
            fig = Figure(figsize=(4.8 * len(keys), 4.0))
            for ax, key in zip(fig.subplots(1, len(keys)), keys, strict=True):
                try:
                    plot_particle_scaling(result["particles"], "a", key, ax).set_title("")
                except ValueError as error:  # nothing to draw, as in plot_panels
                    ax.set_axis_off()
                    ax.set_title(str(error), fontsize=7)
            fig.suptitle("conjugate toy: guide gradient against the number of particles K "
                         "(dashed: least-squares power law)", fontsize=10)
            save_figure(fig, out_dir / "toy_particles.png")
            figures.append(("toy_particles.png", "Variance, SNR and efficiency against the "
                                                 "number of particles K (toy), log-log"))
    else:
        groups = groups_of(main)
        save_figure(plot_panels(lambda g, k, ax: plot_variance_bars(main, g, k, ax), groups,
                                ("total_variance", "median_snr", "efficiency")),
                    out_dir / "variance_bars.png")
        figures.append(("variance_bars.png", "Variance, median SNR and efficiency per "
                                             "estimator and parameter group"))
        for key, plot, name, caption in (
                ("particles", plot_variance_vs_particles, "variance_vs_particles.png",
                 "Total variance and median SNR against the number of particles"),
                ("beta0", plot_variance_vs_beta0, "variance_vs_beta0.png",
                 "Total variance and median SNR against beta0 (guide fixed)"),
                ("along_training", plot_variance_along_training,
                 "variance_along_training.png",
                 "Total variance and median SNR along training")):
            if result.get(key):
                save_figure(plot_panels(
                    lambda g, k, ax, plot=plot, key=key: plot(result[key], g, k, ax), groups,
                    ("total_variance", "median_snr")), out_dir / name)
                figures.append((name, caption))
    (out_dir / "report.md").write_text(variance_report(result, figures))


def _fmt(value, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def summary_table(result: dict, group: str) -> list[str]:
    """Markdown rows: one estimator per row, the summary of ``group`` and the ratios."""
    lines = ["| estimator | N | unbiased | ‖mean‖ | total variance | median SNR | ms/estimate "
             "| efficiency | var / ref | eff / ref |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in result["estimators"].items():
        if group not in entry["groups"]:
            continue
        s = entry["groups"][group]
        r = entry.get("relative", {}).get(group, {})
        snr = s["median_snr"]
        if snr is None and s.get("num_deterministic"):  # read back from JSON, where inf is null
            snr = math.inf
        lines.append(
            f"| {name} | {entry['num_particles']} | {'yes' if entry['unbiased'] else 'no'} | "
            f"{_fmt(s['mean_norm'])} | {_fmt(s['total_variance'])} | {_fmt(snr)} | "
            f"{_fmt(s['seconds'] * 1e3)} | {_fmt(s['efficiency'])} | "
            f"{_fmt(r.get('total_variance_ratio'))} | {_fmt(r.get('efficiency_ratio'))} |")
    return lines


def sweep_table(sweep: dict, axis_key: str, group: str, key: str = "total_variance"
                ) -> list[str]:
    """Markdown rows: estimators by sweep values, one summary ``key`` of ``group``.

    ``sweep["estimators"][name][i]`` is the point at ``sweep[axis_key][i]``."""
    axis = sweep[axis_key]
    lines = ["| estimator | " + " | ".join(str(v) for v in axis) + " |",
             "|---|" + "---|" * len(axis)]
    for name, points in sweep["estimators"].items():
        cells = [_fmt(entry["groups"][group][key]) if "groups" in entry
                 and group in entry["groups"] else "n/a"
                 for entry in aligned_points(points, axis, name)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _slope_cell(fit: dict | None) -> str:
    if not fit:
        return "n/a"
    cell = f"{fit['slope']:+.3f}"
    if fit.get("interval"):
        cell += " [{:+.3f}, {:+.3f}]".format(*fit["interval"])
    if fit.get("standard_error") is not None and math.isfinite(fit["standard_error"]):
        cell += f" ± {fit['standard_error']:.3f}"
    return cell


def particle_scaling_report(sweep: dict) -> list[str]:
    """Markdown lines of the toy's particle sweep: the summaries at each ``K``, the fitted
    slopes beside the papers' and the path-derivative check at the exact posterior."""
    level = round(100 * sweep["level"])
    lines = ["## Scaling with the number of particles K", "",
             f"Guide gradient at a = {sweep['a']}, M = {sweep['num_draws']} draws per estimator "
             "and K. Slopes: least squares of the log summary on log K; "
             f"[low, high] is a {level} % percentile interval over {sweep['num_bootstrap']} "
             "bootstrap resamples of the draws (sampling noise), ± the regression's standard "
             "error (residuals: noise and departure from a power law). The toy's prior is "
             "fixed, so its model has no parameter: only the guide gradient is measured.", ""]
    for key, title in (("total_variance", "total variance"), ("median_snr", "median SNR"),
                       ("seconds", "seconds per estimate"),
                       ("efficiency", "efficiency 1 / (variance x seconds)")):
        lines += [f"{title}:", ""] + sweep_table(sweep, "particles", "a", key) + [""]
    lines += ["Slopes against K; *expected*: the asymptotic values (an ELBO estimator "
              "averages K independent estimates; iwae: Rainforth et al. 2018; dreg: Tucker et "
              "al. 2019).", "",
              "| estimator | variance slope | expected | SNR slope | expected | ‖mean‖ slope "
              "| expected | seconds slope | efficiency slope |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, fits in sweep["slopes"].items():
        expected = sweep["expected_slopes"].get(name, {})
        cells = []
        for key in BOOTSTRAPPED:
            cells += [_slope_cell(fits.get(key)), _fmt(expected.get(key), "+.1f")]
        cells += [_slope_cell(fits.get("seconds")), _slope_cell(fits.get("efficiency"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ks = sweep["particles"]
    lines += ["", "Local slopes between neighbouring K (variance; SNR):", "",
              "| estimator | " + " | ".join(f"{a} → {b}" for a, b in zip(ks, ks[1:])) + " |",
              "|---|" + "---|" * (len(ks) - 1)]
    for name, local in sweep["local_slopes"].items():
        measured = [k for k, entry in zip(ks, aligned_points(sweep["estimators"][name], ks, name))
                    if "groups" in entry]
        pairs = dict(zip(zip(measured, measured[1:]),
                         zip(local.get("total_variance", []), local.get("median_snr", [])),
                         strict=False))
        cells = [f"{_fmt(pairs[p][0], '+.2f')}; {_fmt(pairs[p][1], '+.2f')}" if p in pairs
                 else "n/a" for p in zip(ks, ks[1:])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    posterior = sweep.get("at_posterior")
    if posterior:
        lines += [f"At the exact posterior a = {posterior['a']} ({posterior['num_draws']} "
                  "draws per K), total variance (largest |gradient|):", "",
                  "| estimator | " + " | ".join(f"K = {k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for name, points in posterior["estimators"].items():
            cells = [f"{_fmt(point['total_variance'])} ({_fmt(point['max_abs'])})"
                     if "total_variance" in point else "n/a"
                     for point in aligned_points(points, ks, name)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def variance_report(result: dict, figures: Sequence[tuple[str, str]] = ()) -> str:
    """The markdown report of a lab result."""
    main = result["main"]
    lines = ["# Gradient-variance lab", ""]
    if result["mode"] == "toy":
        lines += [f"Conjugate Dirichlet-categorical toy: counts {main['counts']}, prior "
                  f"{main['prior']}, guide concentration a = {main['a']}, exact ELBO gradient "
                  f"{[round(v, 4) for v in main['exact_gradient']]}. M = {main['num_draws']} "
                  "draws per estimator; seconds per estimate are amortised over vectorised "
                  "replicas.", ""]
        lines += summary_table(main, "a")
        lines += ["", "| estimator | unbiased | bias | max abs z | Hotelling | p-value |",
                  "|---|---|---|---|---|---|"]
        for name, e in main["estimators"].items():
            lines.append(f"| {name} | {'yes' if e['unbiased'] else 'no'} | "
                         f"{[round(b, 4) for b in e['bias']]} | {_fmt(e['max_abs_z'], '.2f')} | "
                         f"{_fmt(e['hotelling'], '.2f')} | {_fmt(e['p_value'], '.3g')} |")
        if result.get("particles"):
            lines += [""] + particle_scaling_report(result["particles"])
    else:
        source = result["source"]
        where = (f"the checkpoint of `{source['run_dir']}` (step {source['step']})"
                 if source["kind"] == "checkpoint" else
                 f"a small model trained here for {source['step']} steps "
                 f"(`{source['run_dir']}`)")
        lines += [f"Measured at {where}, on one training minibatch of shape "
                  f"{main['batch_shape']} (plate size {main['dataset_size']}), "
                  f"M = {main['num_draws']} draws per estimator. Gradients are of the per-token "
                  "loss -ELBO / (N T); beta0 as log beta0. Ratios are to "
                  f"`{main['reference']}`. A parameter whose true gradient is zero has a median "
                  f"SNR of about 0.674 / sqrt(M) = {snr_noise_floor(main['num_draws']):.3f}: "
                  "values near it mean the gradient is not resolved with M draws.", ""]
        for group in groups_of(main):
            lines += [f"## {GROUP_LABELS[group]}", ""] + summary_table(main, group) + [""]
        for key, axis_key, title in (("particles", "particles", "Variance vs particles"),
                                     ("beta0", "beta0_values", "Variance vs beta0"),
                                     ("along_training", "steps", "Variance along training")):
            sweep = result.get(key)
            if not sweep:
                continue
            lines += [f"## {title} (total variance, M = {sweep['num_draws']})", ""]
            for group in groups_of(main):
                lines += [f"{GROUP_LABELS[group]}:", ""] + sweep_table(sweep, axis_key, group)
                lines += [""]
    for name, caption in figures:
        lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)


__all__ = ["groups_of", "particle_scaling_report", "summary_table", "sweep_table",
           "variance_report", "write_lab_outputs"]
