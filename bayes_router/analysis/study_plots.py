"""Plots of the studies: training curves, corpus statistics, gradient-variance results and the
empirical-Bayes fit of ``beta0``.

Same style as :mod:`bayes_router.analysis.plots`: ``plot_<thing>(..., ax=None) -> Axes``, drawing
precomputed values; called without ``ax`` they open a pyplot figure, as in a notebook.
:func:`plot_panels` lays several of them out in one :class:`matplotlib.figure.Figure` made
without pyplot, and :func:`save_figure` writes it: the studies that write files never touch
pyplot's global state, and nothing here chooses a backend (the command line does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from bayes_router.analysis.plots import plot_estimator_bars
from bayes_router.inference.estimators import estimator_names
from bayes_router.variance.lm_variance import GROUP_LABELS, aligned_points


def _axes(ax: Axes | None, figsize=(5.0, 3.4)) -> Axes:
    if ax is None:  # as plots._axes: a new pyplot figure, for interactive use
        _, ax = plt.subplots(figsize=figsize)
    return ax


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> str:
    """Write ``fig`` to ``path`` (tight layout) and return the file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return Path(path).name


def plot_panels(draw: Callable[[str, str, Axes], object], groups: Sequence[str],
                keys: Sequence[str] = ("total_variance",), title: str = "") -> Figure:
    """A grid of panels, one row per summary key and one column per group (a single row of keys
    when there is one group); ``draw(group, key, ax)`` fills one. A panel whose ``draw`` raises
    ``ValueError`` (nothing to draw) says so instead. One legend, merged over the panels."""
    cells = ([(key, groups[0]) for key in keys] if len(groups) == 1 else
             [(key, group) for key in keys for group in groups])
    nrows, ncols = (1, len(keys)) if len(groups) == 1 else (len(keys), len(groups))
    fig = Figure(figsize=(4.4 * ncols, 3.6 * nrows))
    flat = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax, (key, group) in zip(flat, cells, strict=True):
        try:
            draw(group, key, ax)
        except ValueError as error:
            ax.set_axis_off()
            ax.set_title(f"{group}: {error}", fontsize=7)
    legend = {}
    for ax in flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        flat[ncols - 1].legend(list(legend.values()), list(legend), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------- training and data


def plot_training_loss(history: Sequence[Mapping], ax: Axes | None = None) -> Axes:
    """The per-token training objective at every logged step."""
    if not history:
        raise ValueError("nothing to plot: the run has no training history")
    ax = _axes(ax)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], lw=0.8)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="training objective")
    return ax


def plot_training_terms(history: Sequence[Mapping], axes: Sequence[Axes]) -> Sequence[Axes]:
    """The logged parts of the objective on four axes: NLL per token; KL per token per layer
    (solid), split into the per-token information ``I(x; alpha)`` (dashed) and the static
    allocation's ``KL(qbar || p)`` (dotted), with the KL weight in force (right axis); the
    posterior-mean spread across tokens per layer; the mean total concentration ``a0`` per
    layer (Bayesian runs)."""
    logged = [r for r in history if "nll" in r]
    nll_ax, kl_ax, spread_ax, a0_ax = axes
    steps = [r["step"] for r in logged]
    nll_ax.plot(steps, [r["nll"] for r in logged], lw=0.9)
    nll_ax.set(xlabel="step", ylabel="nats/token", title="NLL (one guide sample)")
    layers = len(logged[0]["kl_per_layer"]) if logged else 0
    # histories written before the ELBO surgery was logged have the KL alone
    surgery = bool(logged) and "information_per_layer" in logged[0]
    for layer in range(layers):
        kl_ax.plot(steps, [r["kl_per_layer"][layer] for r in logged], lw=0.9,
                   color=f"C{layer}", label=f"layer {layer}: KL")
        if surgery:
            kl_ax.plot(steps, [r["information_per_layer"][layer] for r in logged], "--",
                       lw=0.9, color=f"C{layer}", label=f"layer {layer}: I(x; alpha)")
            kl_ax.plot(steps, [r["marginal_kl_per_layer"][layer] for r in logged], ":",
                       lw=1.1, color=f"C{layer}", label=f"layer {layer}: KL(qbar || p)")
        spread_ax.plot(steps, [r["spread"][layer] for r in logged], lw=0.9,
                       label=f"layer {layer}")
        if logged[0]["a0"] is not None:
            a0_ax.plot(steps, [r["a0"][layer] for r in logged], lw=0.9, label=f"layer {layer}")
    weight_ax = kl_ax.twinx()
    weight_ax.plot(steps, [r["kl_scale"] for r in logged], "k:", lw=0.9)
    weight_ax.set_ylabel("KL weight (black dotted)")
    kl_ax.set(xlabel="step", ylabel="nats/token", title="KL(q || p) per layer")
    spread_ax.set(xlabel="step", ylabel="std of abar across tokens",
                  title="posterior-mean spread")
    a0_ax.set(xlabel="step", ylabel="mean a0", title="guide total concentration")
    for ax in (kl_ax, spread_ax, a0_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return axes


def plot_validation(evaluations: Sequence[Mapping], ax: Axes | None = None,
                    key: str = "val_bpc") -> Axes:
    """A validation metric at each evaluation of a run."""
    ax = _axes(ax)
    if evaluations:
        ax.plot([e["step"] for e in evaluations], [e[key] for e in evaluations], "o-")
    ax.set(xlabel="step", ylabel=key.replace("_", " "), title="validation")
    return ax


def plot_shares(labels: Sequence[str], shares: Sequence[float], ax: Axes | None = None,
                title: str = "") -> Axes:
    """Bars of shares (e.g. character frequencies or oracle labels of a corpus)."""
    if len(labels) != len(shares) or not len(shares):
        raise ValueError("labels and shares must be non-empty and of one length")
    ax = _axes(ax, figsize=(9.0, 3.0))
    ax.bar(range(len(shares)), shares)
    ax.set_xticks(range(len(shares)), labels, fontsize=7)
    ax.set(ylabel="share", title=title)
    return ax


# ---------------------------------------------------------------------------- gradient variance


SUMMARY_LABELS = {
    "total_variance": "total gradient variance",
    "median_snr": "median signal-to-noise ratio",
    "snr": "signal-to-noise ratio",
    "mean_norm": "norm of the mean gradient",
    "efficiency": "efficiency 1 / (variance × seconds)",
    "seconds": "seconds per estimate",
    "ms": "milliseconds per estimate",
    "total_variance_ratio": "total variance / reference",
    "median_snr_ratio": "median SNR / reference",
    "seconds_ratio": "time / reference",
    "efficiency_ratio": "efficiency / reference",
    "num_deterministic": "deterministic parameters",
}
"""Axis labels of the summary keys of the gradient-variance results."""


def summary_label(key: str) -> str:
    """The axis label of a summary ``key`` (``total_variance`` -> ``total gradient variance``);
    an unknown key with its underscores as spaces."""
    return SUMMARY_LABELS.get(key, key.replace("_", " "))


def _summary_value(summary: dict, key: str) -> float:
    """``summary[key]`` as a float; ``None`` (how strict JSON writes ``inf``) is read back as
    ``inf`` where the summary says it was one: a median SNR of deterministic parameters, the
    efficiency of an estimator with zero variance; else as ``nan``."""
    value = summary.get(key)
    if value is not None:
        return float(value)
    if key == "median_snr" and summary.get("num_deterministic"):
        return math.inf
    if (key == "efficiency" and summary.get("total_variance") == 0
            and (summary.get("seconds") or 0) > 0):
        return math.inf
    return math.nan


def _drawable(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values) & (values > 0)


def _special_text(value: float) -> str:
    """How a value that a log axis cannot place is written on the figure."""
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def _log_frame(values: np.ndarray) -> tuple[float, float, float]:
    """``(low, high, step)`` in ``log10`` of the positive finite ``values`` (``0, 0`` if none),
    ``step`` a quarter of their span (at least half a decade): infinite values are drawn a step
    above ``high``, undrawable ones a step below ``low``."""
    shown = values[_drawable(values)]
    low, high = (np.log10(shown.min()), np.log10(shown.max())) if len(shown) else (0.0, 0.0)
    return low, high, 0.25 * max(high - low, 2.0)


_INFINITE_GID = "infinite-value"
_UNDRAWN_GID = "undrawn-value"


def estimator_color(name: str) -> str:
    """A fixed colour per registered estimator, so that panels and figures agree."""
    names = estimator_names()
    return f"C{names.index(name) % 10}" if name in names else "black"


def plot_variance_bars(result: dict, group: str, key: str = "total_variance",
                       ax: Axes | None = None, ylabel: str | None = None) -> Axes:
    """Bars of one summary ``key`` per estimator for one parameter ``group`` (log scale).

    An infinite value (e.g. the SNR of an estimator with zero variance) is a hatched bar above
    all the others, marked ``∞``. An estimator whose value a log axis cannot show (zero,
    negative, unknown) keeps its slot, with no bar and its value written in it."""
    names = [n for n, e in result["estimators"].items() if group in e["groups"]]
    values = np.array([_summary_value(result["estimators"][n]["groups"][group], key)
                       for n in names], dtype=float)
    finite, infinite = _drawable(values), np.isposinf(values)
    if not (finite | infinite).any():
        raise ValueError(f"no estimator has a positive {key} for group {group!r}")
    low, high, step = _log_frame(values)
    top = 10.0 ** (high + step)
    labels = [f"{n} (N={result['estimators'][n]['num_particles']})" for n in names]
    heights = np.where(finite, values, top)  # the undrawable bars are removed below
    ax = plot_estimator_bars(labels, heights, ax=ax, ylabel=ylabel or summary_label(key))
    bars = ax.patches[-len(heights):]
    for position, (bar, value) in enumerate(zip(bars, values, strict=True)):
        if np.isposinf(value):
            bar.set(hatch="//", alpha=0.5, gid=_INFINITE_GID)
            ax.annotate("∞", (position, top), xytext=(0, 1), textcoords="offset points",
                        ha="center", va="bottom", fontsize=12, gid=_INFINITE_GID)
        elif not np.isfinite(value) or value <= 0:
            bar.remove()
            ax.text(position, 0.03, f"{_special_text(value)} (not drawn)", rotation=90,
                    transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7,
                    color="dimgray", gid=_UNDRAWN_GID)
    if not finite.all():
        ax.set_ylim(10.0 ** (low - step), 10.0 ** (high + 1.8 * step))
    ax.set_title(GROUP_LABELS.get(group, group), fontsize=9)
    return ax


def _plot_sweep(sweep: dict, axis_key: str, group: str, key: str, ax: Axes | None,
                xlabel: str) -> Axes:
    """One line per estimator of ``key`` against ``sweep[axis_key]`` on a log y axis, its
    points ``sweep["estimators"][name]`` aligned with the axis (``{"skipped": reason}`` where
    not measured). An infinite value is a triangle marked ``∞`` above the other points; a value
    a log axis cannot show (zero, negative, unknown) is a triangle below them marked with the
    value.

    :raises ValueError: when there is nothing to draw, or an estimator's points are not a list
        as long as the axis."""
    ax = _axes(ax)
    curves = []
    for name, points in sweep["estimators"].items():
        xs, ys = [], []
        for x, entry in zip(sweep[axis_key], aligned_points(points, sweep[axis_key], name),
                            strict=True):
            if "groups" in entry and group in entry["groups"]:
                xs.append(x)
                ys.append(_summary_value(entry["groups"][group], key))
        if xs:
            curves.append((name, np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)))
    if not curves:
        raise ValueError(f"nothing to draw: no {key} for group {group!r}")
    every = np.concatenate([ys for _, _, ys in curves])
    if not (_drawable(every) | np.isposinf(every)).any():
        raise ValueError(f"nothing to draw: no positive {key} for group {group!r}")
    low, high, step = _log_frame(every)
    for name, xs, ys in curves:
        color, shown = estimator_color(name), _drawable(ys)
        label = name
        if shown.any():
            ax.plot(xs, np.where(shown, ys, np.nan), marker="o", label=label, color=color)
            label = "_nolegend_"
        for x, y in zip(xs[~shown], ys[~shown], strict=True):
            above = bool(np.isposinf(y))
            where = 10.0 ** (high + step if above else low - step)
            ax.plot([x], [where], marker="^" if above else "v", markersize=7, linestyle="none",
                    color=color, label=label, gid=_INFINITE_GID if above else _UNDRAWN_GID)
            label = "_nolegend_"
            ax.annotate("∞" if above else _special_text(y), (x, where),
                        xytext=(0, 5 if above else -5), textcoords="offset points",
                        ha="center", va="bottom" if above else "top", fontsize=10, color=color,
                        gid=_INFINITE_GID if above else _UNDRAWN_GID)
    ax.set_yscale("log")
    if not _drawable(every).all():
        ax.set_ylim(10.0 ** (low - 2 * step), 10.0 ** (high + 2 * step))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(summary_label(key))
    ax.set_title(GROUP_LABELS.get(group, group), fontsize=9)
    return ax


def plot_variance_vs_particles(sweep: dict, group: str, key: str = "total_variance",
                               ax: Axes | None = None) -> Axes:
    """Total variance (or another summary) against the number of particles, log-log."""
    ax = _plot_sweep(sweep, "particles", group, key, ax, "particles N")
    ax.set_xscale("log", base=2)
    return ax


def plot_variance_vs_beta0(sweep: dict, group: str, key: str = "total_variance",
                           ax: Axes | None = None) -> Axes:
    """Total variance (or another summary) against the prior concentration, log-log."""
    ax = _plot_sweep(sweep, "beta0_values", group, key, ax, "prior concentration beta0")
    ax.set_xscale("log")
    return ax


def plot_variance_along_training(sweep: dict, group: str, key: str = "total_variance",
                                 ax: Axes | None = None) -> Axes:
    """Total variance (or another summary) at each measured training step."""
    return _plot_sweep(sweep, "steps", group, key, ax, "training step")


def slope_label(name: str, fit: Mapping | None) -> str:
    """``name`` with its fitted log-log slope and, where there is one, its interval
    (``iwae: K^-0.49 [-0.52, -0.46]``); ``name`` alone without a fit."""
    if not fit:
        return name
    label = f"{name}: K^{fit['slope']:+.2f}"
    if fit.get("interval"):
        low, high = fit["interval"]
        label += f" [{low:+.2f}, {high:+.2f}]"
    return label


def plot_particle_scaling(sweep: dict, group: str, key: str = "total_variance",
                          ax: Axes | None = None) -> Axes:
    """:func:`plot_variance_vs_particles` with each estimator's fitted power law
    ``exp(intercept) K^slope`` from ``sweep["slopes"][name][key]`` drawn dashed over the
    measured range of ``K``, and its slope (and interval) in the axes' own legend."""
    ax = plot_variance_vs_particles(sweep, group, key, ax)
    ax.set_yscale("log")
    fits = {name: (sweep.get("slopes", {}).get(name) or {}).get(key)
            for name in sweep["estimators"]}
    for line in ax.get_lines():
        name = line.get_label()
        if name in fits:
            line.set_label(slope_label(name, fits[name]))
    for name, fit in fits.items():
        points = aligned_points(sweep["estimators"][name], sweep["particles"], name)
        measured = [k for k, entry in zip(sweep["particles"], points, strict=True)
                    if "groups" in entry]
        if not fit or not measured:
            continue
        ks = np.array([min(measured), max(measured)], dtype=float)
        ax.plot(ks, np.exp(fit["intercept"]) * ks ** fit["slope"], linestyle="--",
                linewidth=1.0, color=estimator_color(name), label="_nolegend_")
    ax.set_xlabel("particles K")
    ax.legend(fontsize=6)
    return ax


# ---------------------------------------------------------------------------- empirical Bayes


def _objective_window(grid: np.ndarray, objective: np.ndarray, floor: float,
                      marks: Sequence[float]) -> tuple[float, float]:
    """The ``beta0`` range of :func:`plot_beta0_objective`: the grid points where the objective
    is above ``floor`` (the bottom of the y-range) and one more on either side, so that the
    curve enters and leaves the panel, widened to hold every mark."""
    order = np.argsort(grid)
    grid, objective = grid[order], objective[order]
    above = np.flatnonzero(np.isfinite(objective) & (objective >= floor))
    if len(above):
        first, last = max(above[0] - 1, 0), min(above[-1] + 1, len(grid) - 1)
    else:
        first, last = 0, len(grid) - 1
    marks = [m for m in marks if math.isfinite(m) and m > 0]
    return min([grid[first], *marks]), max([grid[last], *marks])


def plot_beta0_objective(grid: Sequence[float], kl: Sequence[float],
                         estimates: Mapping[str, float], ax: Axes | None = None,
                         marked_kl: Sequence[float] = (), styles: Mapping | None = None,
                         title: str = "") -> Axes:
    """The held-out ``-KL`` per token against ``beta0``, each estimate a vertical line.

    The y-range zooms on the estimates' ``-KL`` values ``marked_kl`` (twice their distance
    below the best value); the x-range follows it: the ``beta0`` where the curve is inside the
    y-range, one grid point beyond on either side and every estimate. The x axis is
    logarithmic when that range spans a decade or more, linear otherwise.

    :param styles: ``name -> (color, linestyle)`` of the estimates.
    """
    if len(grid) != len(kl) or not len(grid):
        raise ValueError("grid and kl must be non-empty and of one length")
    beta0 = np.asarray(grid, dtype=float)
    objective = -np.asarray(kl, dtype=float)
    ax = _axes(ax, figsize=(4.0, 3.3))
    ax.plot(beta0, objective, color="black", lw=1, marker=".", markersize=3)
    for name, value in estimates.items():
        color, style = (styles or {}).get(name, ("C0", "-"))
        ax.axvline(value, color=color, linestyle=style, label=f"{name} ({value:.3g})")
    marked = [-v for v in marked_kl]
    peak = float(np.nanmax([*marked, *objective]))
    if marked:
        span = max(2.0 * (peak - min(marked)), 1e-3)
        ax.set_ylim(peak - span, peak + 0.1 * span)
        floor = peak - span
    else:
        floor = -math.inf
    low, high = _objective_window(beta0, objective, floor, list(estimates.values()))
    if high / low >= 10.0:
        ax.set_xscale("log")
        pad = (high / low) ** 0.04
        ax.set_xlim(low / pad, high * pad)
    else:
        pad = 0.04 * (high - low) or 0.05 * high
        ax.set_xlim(low - pad, high + pad)
    ax.set(xlabel="beta0", ylabel="held-out -KL per token (nats)", title=title)
    ax.legend(fontsize=7)
    return ax


def plot_beta0_trace(trace: Sequence[Sequence[float]], ax: Axes | None = None) -> Axes:
    """``beta0`` of every layer at each SVI step (log axis)."""
    if not trace:
        raise ValueError("nothing to plot: empty beta0 trace")
    ax = _axes(ax, figsize=(4.0, 3.3))
    steps = range(1, len(trace) + 1)
    for layer in range(len(trace[0])):
        ax.plot(steps, [t[layer] for t in trace], label=f"layer {layer}")
    ax.set_yscale("log")
    ax.set(xlabel="SVI step", ylabel="beta0", title="type-II ML in SVI")
    ax.legend(fontsize=7)
    return ax


def plot_bench_experts(results: Mapping, ax: Axes | None = None, key: str = "fwd_ms") -> Axes:
    """Each expert's attention-core time (``key``: ``fwd_ms`` or ``fwd_bwd_ms``) against the
    sequence length, log-log, from ``bayes-router bench`` results."""
    ax = _axes(ax)
    rows = results["experts"]
    for name in dict.fromkeys(r["expert"] for r in rows):
        mine = [r for r in rows if r["expert"] == name]
        ax.plot([r["seq_len"] for r in mine], [r[key] for r in mine], "o-", label=name)
    ax.set(xscale="log", yscale="log", xlabel="sequence length T",
           ylabel=("forward" if key == "fwd_ms" else "forward + backward") + " time (ms)",
           title="attention core")
    lengths = sorted({r["seq_len"] for r in rows})
    ax.set_xticks(lengths, [str(t) for t in lengths])  # the measured lengths, no 10^k clutter
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=8)
    return ax


def plot_bench_hard_layer(hard_layer: Mapping, ax: Axes | None = None) -> Axes:
    """The hard-routed layer's forward time relative to full-only for each expert mix, beside
    the cost the FLOP model projects (with projections) for it."""
    ax = _axes(ax)
    rows = hard_layer["mixes"]
    labels = ["/".join(f"{s:g}" for s in r["mix"]) for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["fwd_ratio"] for r in rows], 0.4, label="measured")
    ax.bar(x + 0.2, [r["projected_cost_with_projections"] for r in rows], 0.4,
           label="projected (FLOPs)")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(x, labels)
    ax.set(xlabel="mix full/linear/local", ylabel="time / full-only",
           title=f"hard-routed layer, T={hard_layer['seq_len']}")
    ax.legend(fontsize=8)
    return ax
