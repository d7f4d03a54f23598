"""The figures of a run's analysis report: each a :class:`matplotlib.figure.Figure` made
without pyplot, composed of the ``plot_<thing>(..., ax)`` panels of
:mod:`bayes_router.analysis.plots`."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from bayes_router.analysis.calibration_metrics import ReliabilityCurve
from bayes_router.analysis.plots import (
    plot_reliability_diagram,
    plot_risk_coverage,
    plot_routing_simplex,
    plot_smooth_reliability_diagram,
    plot_uncertainty_strip,
    plot_uncertainty_vs_damage,
)
from bayes_router.analysis.selective import RiskCoverageCurve
from bayes_router.analysis.smooth_calibration import SmoothReliabilityCurve
from bayes_router.analysis.token_statistics import uncertainty_scores


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


def smooth_reliability_figure(curves: dict[str, SmoothReliabilityCurve]) -> Figure:
    """One smoothed reliability diagram per predictive, side by side, each titled with its
    smooth ECE and bandwidth."""
    if not curves:
        raise ValueError("curves is empty: nothing to draw")
    fig = Figure(figsize=(3.6 * len(curves), 3.5))
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, curve) in zip(axes, curves.items(), strict=True):
        plot_smooth_reliability_diagram(curve=curve, ax=ax)
        ax.set_title(f"{name}:\nsmECE {curve.smooth_ece:.3f} (σ = {curve.bandwidth:.3f})",
                     fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def risk_coverage_figure(curves: dict[str, dict[str, RiskCoverageCurve]],
                         oracle: dict[str, RiskCoverageCurve] | None = None,
                         reference: str | None = None) -> Figure:
    """Risk-coverage curves, one panel per risk (e.g. error and NLL), one line per score; the
    ``reference`` score drawn black, the ``oracle`` (ranking by the loss itself) dotted.

    :param curves: ``{risk: {score: curve}}``.
    """
    if not curves or not all(curves.values()):
        raise ValueError("curves is empty: nothing to draw")
    fig = Figure(figsize=(4.4 * len(curves), 3.6))
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (risk, by_score) in zip(axes, curves.items(), strict=True):
        for name, curve in by_score.items():
            style = {"color": "black", "linewidth": 2} if name == reference else {}
            plot_risk_coverage(curve=curve, ax=ax, label=name, **style)
        if oracle is not None and risk in oracle:
            plot_risk_coverage(curve=oracle[risk], ax=ax, label="oracle (ranked by the loss)",
                               color="gray", linestyle=":")
        ax.set_ylabel(f"{risk} of the kept tokens")
        ax.legend(fontsize=7)
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
