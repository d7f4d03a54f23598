"""Figures of routing, calibration and uncertainty (matplotlib only).

Every function is ``plot_<thing>(..., ax=None) -> Axes``: it draws into ``ax`` (a new figure's
axes when ``None``) and returns it, so figures compose and tests can inspect the artists. Plots
take precomputed values or compute them with the functions of
:mod:`~bayes_router.analysis.calibration_metrics` and :mod:`~bayes_router.analysis.diagnostics`.
A plot with nothing to draw raises ``ValueError`` rather than returning an empty figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.patches import Patch

from bayes_router.analysis.calibration_metrics import ReliabilityCurve, reliability_curve
from bayes_router.analysis.diagnostics import mean_by_uncertainty_bin
from bayes_router.analysis.selective import RiskCoverageCurve, risk_coverage_curve
from bayes_router.analysis.smooth_calibration import (
    SmoothReliabilityCurve,
    smooth_reliability_curve,
)
from bayes_router.core.arrays import check_same_length, check_simplex, float_array, to_numpy
from bayes_router.core.routing import expert_share

DEFAULT_EXPERT_NAMES = ("full", "linear", "local")
_SIMPLEX_VERTICES = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3.0) / 2.0]])  # (3, 2)
_SIMPLEX_GID = "routing-simplex-triangle"


def _axes(ax: Axes | None) -> Axes:
    if ax is None:
        _, ax = plt.subplots()
    return ax


def _nothing_to_draw(name: str, what: str) -> ValueError:
    return ValueError(f"{name} is empty: nothing to draw ({what})")


def _data_or_curve(plot: str, names: tuple[str, str], data: tuple, curve, compute):
    """The curve a ``plot_<thing>`` draws: ``curve`` as given, or ``compute()`` from its two
    ``data`` arrays; exactly one of the two must be given, and the data must not be empty."""
    given = [x is not None for x in data]
    if curve is not None:
        if any(given):
            raise ValueError(f"pass either {names[0]} and {names[1]}, or curve, not both")
        return curve
    if not all(given):
        raise ValueError(f"{plot} needs {names[0]} and {names[1]}, or curve")
    if any(np.size(x) == 0 for x in data):
        raise _nothing_to_draw(names[0], "no predictions")
    return compute()


def _checked(values, name: str, ndims: tuple[int, ...], what: str) -> np.ndarray:
    """``float_array`` that reports empty input as 'nothing to draw'."""
    if np.size(values) == 0:
        raise _nothing_to_draw(name, what)
    return float_array(values, name, ndims=ndims)


def plot_reliability_diagram(probs=None, labels=None, *, curve: ReliabilityCurve | None = None,
                             n_bins: int = 15, binning: str = "equal-width",
                             ax: Axes | None = None, label: str | None = None) -> Axes:
    """Accuracy per confidence bin as bars spanning the bins, the diagonal of perfect calibration,
    and each bin's count written at its bar (see :func:`_count_labels`). Empty bins draw no bar
    and no count.

    :param probs: predicted probabilities ``(N, C)`` (with ``labels``), or
    :param curve: a precomputed
        :class:`~bayes_router.analysis.calibration_metrics.ReliabilityCurve`.
    :param n_bins: bins when computing the curve.
    :param binning: ``"equal-width"`` or ``"equal-mass"`` when computing the curve.
    :param label: legend entry of the bars.
    """
    curve = _data_or_curve("plot_reliability_diagram", ("probs", "labels"), (probs, labels),
                           curve, lambda: reliability_curve(probs, labels, n_bins=n_bins,
                                                            binning=binning))
    count = np.asarray(curve.count)
    filled = count > 0
    if not filled.any():
        raise _nothing_to_draw("curve", "every bin is empty")
    edges = np.asarray(curve.edges, dtype=np.float64)
    left, width = edges[:-1][filled], np.diff(edges)[filled]
    accuracy = np.asarray(curve.accuracy)[filled]
    ax = _axes(ax)
    ax.bar(left, accuracy, width=width, align="edge", edgecolor="black", alpha=0.7, label=label)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1)
    _count_labels(ax, left, width, accuracy, count[filled].astype(int))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    if label is not None:
        ax.legend()
    return ax


_COUNT_GID = "reliability-count"
_COUNT_NOTE_GID = "reliability-count-note"


def _axes_width_points(ax: Axes) -> float:
    """The width of ``ax`` in points, from its figure's size (before any layout is done)."""
    figure = ax.figure.figure  # the root figure, also for a subfigure's axes
    return float(ax.get_position().width * figure.get_size_inches()[0] * 72.0)


def _count_labels(ax: Axes, left: np.ndarray, width: np.ndarray, accuracy: np.ndarray,
                  count: np.ndarray, fontsize: float = 7.0, smallest: float = 5.5) -> None:
    """Write each filled bin's count at its bar of a reliability diagram, so that no two
    overlap: across the bar when every count fits its bin's width, else along it (rotated),
    in a font shrunk (down to ``smallest``) to the narrowest bin. Bins still too narrow for
    their count beside their neighbours' (equal-mass bins crowd near confidence 1) are left
    unlabelled, the largest counts first kept, and a note gives how many and their counts'
    range. A rotated count sits inside the top of a tall bar and above a short one."""
    # the axes' width shrinks a little in a layout (tight_layout of a grid): keep a margin
    points = width * 0.85 * _axes_width_points(ax)  # bin widths in points (x from 0 to 1)
    digit, gap = 0.62, 1.5  # a digit's advance and the space between labels, per point of font
    widest = max(len(str(n)) for n in count)
    rotate = bool(np.any(widest * digit * fontsize + gap > points))
    if rotate:
        fontsize = float(np.clip((points.min() - gap) / 1.15, smallest, fontsize))
    centers = left + width / 2
    extent = np.array([(1.15 * fontsize if rotate else len(str(n)) * digit * fontsize) + gap
                       for n in count]) / (0.85 * _axes_width_points(ax))  # in x units
    kept: list[int] = []
    for i in np.argsort(-count, kind="stable"):
        if all(abs(centers[i] - centers[j]) >= (extent[i] + extent[j]) / 2 for j in kept):
            kept.append(int(i))
    for i in sorted(kept):
        inside = rotate and accuracy[i] >= 0.5
        ax.annotate(str(count[i]), (centers[i], accuracy[i]),
                    xytext=(0, -2 if inside else 2), textcoords="offset points",
                    ha="center", va="top" if inside else "bottom",
                    rotation=90 if rotate else 0, fontsize=fontsize, gid=_COUNT_GID)
    left_out = np.delete(count, kept)
    if len(left_out):
        spread = (f"{left_out.min()}" if left_out.min() == left_out.max()
                  else f"{left_out.min()}-{left_out.max()}")
        ax.text(0.02, 0.98, f"{len(left_out)} narrow bins unlabelled (counts {spread})",
                transform=ax.transAxes, ha="left", va="top", fontsize=6, color="dimgray",
                gid=_COUNT_NOTE_GID)


def _escape(character: str) -> str:
    return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(character, character)


def plot_uncertainty_strip(text: str, uncertainty, ax: Axes | None = None,
                           layer_names: Sequence[str] | None = None, cmap: str = "viridis",
                           colorbar: bool = False) -> Axes:
    """A heat strip of per-token uncertainty under the characters of ``text``: one image row per
    layer, the characters (``\\n`` and ``\\t`` escaped) as x tick labels.

    :param text: the ``T`` characters.
    :param uncertainty: ``(L, T)`` or ``(T,)`` values.
    :param layer_names: ``L`` row labels (default ``layer 0``, ``layer 1``, ...).
    :param colorbar: add a colorbar to the axes' figure.
    """
    if len(text) == 0:
        raise _nothing_to_draw("text", "no characters")
    values = _checked(uncertainty, "uncertainty", (1, 2), "no tokens")
    if values.ndim == 1:
        values = values[None]  # (1, T)
    n_layers, n_tokens = values.shape
    if n_tokens != len(text):
        raise ValueError(f"uncertainty has {n_tokens} columns but text has {len(text)} characters")
    if layer_names is None:
        layer_names = [f"layer {layer}" for layer in range(n_layers)]
    elif len(layer_names) != n_layers:
        raise ValueError(f"layer_names must have {n_layers} entries, got {len(layer_names)}")
    ax = _axes(ax)
    image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xticks(np.arange(n_tokens), [_escape(c) for c in text], fontfamily="monospace")
    ax.set_yticks(np.arange(n_layers), list(layer_names))
    ax.tick_params(axis="x", length=0)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="uncertainty (nats)")
    return ax


#: Colour of a token that went soft (every expert mixed) in :func:`plot_routing_along_text`.
SOFT_COLOUR = (0.62, 0.62, 0.62, 1.0)


def _routing_codes(experts, n_experts: int) -> np.ndarray:
    """``(L, T)`` or ``(T,)`` expert indices -> an ``(L, T)`` int array, checked: each an expert
    in ``[0, n_experts)``, ``-1`` (soft) or ``-2`` (not read)."""
    if np.size(experts) == 0:
        raise _nothing_to_draw("experts", "no tokens")
    codes = float_array(experts, "experts", ndims=(1, 2))
    if np.any(codes != np.round(codes)):
        raise ValueError("experts must hold integer expert indices")
    codes = codes.astype(np.int64)
    bad = (codes < -2) | (codes >= n_experts)
    if np.any(bad):
        raise ValueError(f"experts must hold expert indices in [0, {n_experts}), -1 (soft) or "
                         f"-2 (not read), got {int(codes[bad][0])}")
    return codes if codes.ndim == 2 else codes[None]  # (L, T)


def plot_routing_along_text(experts, uncertainty=None,
                            expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES,
                            text: str | None = None, ax: Axes | None = None,
                            layer_names: Sequence[str] | None = None,
                            max_characters: int = 160) -> Axes:
    """Where each token of a sequence was routed, layer by layer: one image row per layer, one
    column per token, coloured by the expert it read (``C0``, ``C1``, ... in the order of
    ``expert_names``), grey where it went soft (every expert mixed), blank where no pass read
    it; a legend names the colours.

    :param experts: ``(L, T)`` or ``(T,)`` expert indices, ``-1`` soft, ``-2`` not read (as
        :attr:`~bayes_router.inference.decoding.Generation.experts` of one sequence).
    :param uncertainty: ``(L, T)`` or ``(T,)`` normalised routing uncertainty in ``[0, 1]``
        (``nan`` where none), drawn as a black line across each layer's row: near its bottom
        edge for 0 (``layer + 0.4``), near its top for 1 (``layer - 0.4``).
    :param expert_names: ``K`` legend entries.
    :param text: the ``T`` characters, written (``\\n`` and ``\\t`` escaped) along the x axis
        when there are at most ``max_characters`` of them; else the axis counts tokens.
    :param layer_names: ``L`` row labels (default ``layer 0``, ``layer 1``, ...).
    """
    codes = _routing_codes(experts, len(expert_names))
    n_layers, n_tokens = codes.shape
    if layer_names is None:
        layer_names = [f"layer {layer}" for layer in range(n_layers)]
    elif len(layer_names) != n_layers:
        raise ValueError(f"layer_names must have {n_layers} entries, got {len(layer_names)}")
    if text is not None and len(text) != n_tokens:
        raise ValueError(f"experts has {n_tokens} columns but text has {len(text)} characters")
    line = None
    if uncertainty is not None:
        line = to_numpy(uncertainty, "uncertainty").astype(np.float64)
        if line.ndim == 1:
            line = line[None]  # (1, T)
        if line.shape != codes.shape:
            raise ValueError(f"uncertainty must have the shape of experts {codes.shape}, got "
                             f"{line.shape}")
        given = line[~np.isnan(line)]
        if np.any((given < 0) | (given > 1)):
            raise ValueError("uncertainty must lie in [0, 1] (normalised) or be NaN")
    colours = [to_rgba(f"C{k}") for k in range(len(expert_names))]
    image = np.zeros((n_layers, n_tokens, 4))  # RGBA; alpha 0 where the token was not read
    for k, colour in enumerate(colours):
        image[codes == k] = colour
    image[codes == -1] = SOFT_COLOUR
    ax = _axes(ax)
    ax.imshow(image, aspect="auto", interpolation="nearest")
    if line is not None:
        columns = np.arange(n_tokens)
        for layer in range(n_layers):
            ax.plot(columns, layer + 0.4 - 0.8 * line[layer], color="black", linewidth=0.8)
    if text is not None and n_tokens <= max_characters:
        ax.set_xticks(np.arange(n_tokens), [_escape(c) for c in text], fontfamily="monospace",
                      fontsize=7)
        ax.tick_params(axis="x", length=0)
    else:
        ax.set_xlabel("token")
    ax.set_yticks(np.arange(n_layers), list(layer_names))
    ax.set_ylim(n_layers - 0.5, -0.5)
    handles = [Patch(color=colour, label=name) for colour, name in zip(colours, expert_names,
                                                                       strict=True)]
    handles.append(Patch(color=SOFT_COLOUR, label="soft (all experts)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              fontsize=8)
    return ax


def _simplex_xy(points: np.ndarray) -> np.ndarray:
    """Barycentric ``(S, 3)`` -> Cartesian ``(S, 2)`` on the triangle of ``_SIMPLEX_VERTICES``."""
    return points @ _SIMPLEX_VERTICES


def plot_routing_simplex(samples, ax: Axes | None = None, prior_mean=None,
                         expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES,
                         label: str | None = None, alpha: float = 0.4, size: float = 8.0) -> Axes:
    """Ternary scatter of routing-weight samples on the 2-simplex.

    The triangle and its vertex names are drawn once per axes, so calling again on the same
    ``ax`` adds another token's samples (one scatter collection per call).

    :param samples: Dirichlet samples ``(S, 3)``, rows on the simplex.
    :param prior_mean: optional point ``(3,)`` marked with a star.
    :param expert_names: names of the three vertices (bottom-left, bottom-right, top).
    :param label: legend entry of the samples.
    """
    points = _checked(samples, "samples", (2,), "no samples")
    if points.shape[1] != 3:
        raise ValueError(f"samples must have shape (S, 3), got {points.shape}")
    check_simplex(points, "samples")
    if len(expert_names) != 3:
        raise ValueError(f"expert_names must name 3 experts, got {len(expert_names)}")
    ax = _axes(ax)
    if not any(line.get_gid() == _SIMPLEX_GID for line in ax.lines):
        corners = np.vstack([_SIMPLEX_VERTICES, _SIMPLEX_VERTICES[:1]])
        ax.plot(corners[:, 0], corners[:, 1], color="black", linewidth=1, gid=_SIMPLEX_GID)
        offsets = [(0, -10), (0, -10), (0, 4)]
        alignments = ["right", "left", "center"]
        for vertex, name, offset, ha in zip(_SIMPLEX_VERTICES, expert_names, offsets, alignments,
                                            strict=True):
            ax.annotate(name, vertex, xytext=offset, textcoords="offset points", ha=ha)
        ax.set_aspect("equal")
        ax.set_xlim(-0.08, 1.08)
        ax.set_ylim(-0.1, 0.96)
        ax.set_axis_off()
    xy = _simplex_xy(points)
    ax.scatter(xy[:, 0], xy[:, 1], s=size, alpha=alpha, label=label)
    if prior_mean is not None:
        mean = float_array(prior_mean, "prior_mean", ndims=(1,))
        if mean.shape != (3,):
            raise ValueError(f"prior_mean must have shape (3,), got {mean.shape}")
        check_simplex(mean, "prior_mean")
        mean_xy = _simplex_xy(mean[None])
        ax.scatter(mean_xy[:, 0], mean_xy[:, 1], marker="*", s=150, color="black",
                   zorder=3, label="prior mean")
    return ax


def plot_expert_share(share=None, ax: Axes | None = None,
                      expert_names: Sequence[str] = DEFAULT_EXPERT_NAMES, *, abar=None) -> Axes:
    """Stacked bars of the fraction of tokens routed to each expert, one bar per layer, the
    legend outside the axes on the right (so that it never covers a bar).

    :param share: ``(L, K)`` shares (rows summing to 1), or
    :param abar: routing weights ``(L, N, K)`` passed to
        :func:`~bayes_router.core.routing.expert_share`.
    :param expert_names: ``K`` legend entries.
    """
    if (share is None) == (abar is None):
        raise ValueError("pass exactly one of share or abar")
    if abar is not None:
        if np.size(abar) == 0:
            raise _nothing_to_draw("abar", "no tokens")
        share = expert_share(abar)
    values = _checked(share, "share", (1, 2), "no layers")
    if values.ndim == 1:
        values = values[None]  # (1, K)
    n_layers, n_experts = values.shape
    if len(expert_names) != n_experts:
        raise ValueError(f"expert_names must have {n_experts} entries, got {len(expert_names)}")
    ax = _axes(ax)
    layers = np.arange(n_layers)
    bottom = np.zeros(n_layers)
    for k, name in enumerate(expert_names):
        ax.bar(layers, values[:, k], bottom=bottom, label=name)
        bottom += values[:, k]
    ax.set_xticks(layers, [str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("share of tokens")
    ax.set_ylim(0, 1)
    # the bars fill the axes, so the legend goes beside them, outside (a layout makes room)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
              ncols=1 + (n_experts - 1) // 16)
    return ax


def plot_uncertainty_vs_damage(uncertainty, damage, ax: Axes | None = None, n_bins: int = 10,
                               label: str | None = None) -> Axes:
    """Mean damage per equal-mass uncertainty bin (deciles by default), plotted at each bin's
    mean uncertainty: a rising line means uncertainty flags the tokens hard routing hurts.

    :param uncertainty: per-token uncertainty ``(N,)``.
    :param damage: per-token ``KL(soft || hard)`` ``(N,)``.
    """
    score = _checked(uncertainty, "uncertainty", (1,), "no tokens")
    harm = _checked(damage, "damage", (1,), "no tokens")
    check_same_length(uncertainty=score, damage=harm)
    binned = mean_by_uncertainty_bin(harm, score, n_bins)
    filled = binned["count"] > 0
    ax = _axes(ax)
    ax.plot(binned["mean_uncertainty"][filled], binned["mean_value"][filled], marker="o",
            label=label)
    ax.set_xlabel("routing uncertainty (bin mean)")
    ax.set_ylabel("mean damage KL(soft || hard) (nats)")
    if label is not None:
        ax.legend()
    return ax


def plot_beta0_sensitivity(beta0_values, values=None, ax: Axes | None = None, *,
                           mean=None, low=None, high=None, ylabel: str = "projected FLOP cost (%)",
                           mark: float | None = None, label: str | None = None) -> Axes:
    """A metric against the prior concentration ``beta0`` on a log axis: the mean line and a band.

    :param beta0_values: the ``beta0`` grid ``(n_values,)``, all > 0.
    :param values: ``(n_seeds, n_values)`` results; the line is the mean over seeds and the band
        spans the seeds' minimum to maximum. Or pass
    :param mean: precomputed line ``(n_values,)``, with optional ``low`` and ``high`` for the band
        (e.g. a bootstrap interval).
    :param mark: an empirical-Bayes estimate of ``beta0``, drawn as a vertical line.
    """
    beta0 = _checked(beta0_values, "beta0_values", (1,), "no beta0 values")
    if np.any(beta0 <= 0):
        raise ValueError("beta0_values must be > 0 for a log axis")
    if (values is None) == (mean is None):
        raise ValueError("pass exactly one of values or mean")
    if values is not None:
        grid = _checked(values, "values", (1, 2), "no results")
        if grid.ndim == 1:
            grid = grid[None]  # (1, n_values)
        line, low, high = grid.mean(0), grid.min(0), grid.max(0)
        if len(grid) == 1:
            low = high = None
    else:
        line = _checked(mean, "mean", (1,), "no results")
        if (low is None) != (high is None):
            raise ValueError("pass both low and high for a band, or neither")
        if low is not None:
            low = float_array(low, "low", ndims=(1,))
            high = float_array(high, "high", ndims=(1,))
            check_same_length(mean=line, low=low, high=high)
    check_same_length(beta0_values=beta0, **{"values" if values is not None else "mean": line})
    order = np.argsort(beta0)
    ax = _axes(ax)
    (drawn,) = ax.plot(beta0[order], line[order], marker="o", label=label)
    if low is not None:
        ax.fill_between(beta0[order], low[order], high[order], alpha=0.25,
                        color=drawn.get_color(), linewidth=0)
    if mark is not None:
        if not mark > 0:
            raise ValueError(f"mark must be > 0 (a beta0 value), got {mark!r}")
        ax.axvline(mark, color="black", linestyle=":", label=f"empirical Bayes ({mark:.3g})")
    ax.set_xscale("log")
    ax.set_xlabel("prior concentration beta0")
    ax.set_ylabel(ylabel)
    if label is not None or mark is not None:
        ax.legend()
    return ax


def plot_estimator_bars(names: Sequence[str], values, ax: Axes | None = None,
                        ylabel: str = "gradient variance", log: bool = True) -> Axes:
    """One bar per estimator (variance, SNR, efficiency...), on a log scale by default.

    :param names: estimator names ``(E,)``.
    :param values: one value per estimator ``(E,)``; positive when ``log``.
    """
    if len(names) == 0:
        raise _nothing_to_draw("names", "no estimators")
    heights = _checked(values, "values", (1,), "no estimators")
    if len(heights) != len(names):
        raise ValueError(f"values has {len(heights)} entries but names has {len(names)}")
    if log and np.any(heights <= 0):
        raise ValueError("values must be > 0 on a log axis (pass log=False)")
    ax = _axes(ax)
    positions = np.arange(len(names))
    ax.bar(positions, heights)
    ax.set_xticks(positions, list(names), rotation=30, ha="right")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    return ax


DENSITY_HEIGHT = 0.25  # the density's peak, as a share of the reliability diagram's height
SUPPORTED_DENSITY = 0.01  # the smoothed curve is drawn bold where the density exceeds this x peak


def plot_smooth_reliability_diagram(confidence=None, correct=None, *,
                                    curve: SmoothReliabilityCurve | None = None,
                                    ax: Axes | None = None, label: str | None = None,
                                    color="C3") -> Axes:
    """The smoothed reliability diagram (Błasiok & Nakkiran 2023): the kernel-smoothed accuracy
    against confidence, its bootstrap band when the curve has one, the diagonal of perfect
    calibration, and the density of the confidences as a grey area along the bottom (peak
    scaled to a quarter of the height). The curve is bold where the density exceeds 1 % of its
    peak and faint elsewhere, where it rests on almost no tokens.

    :param confidence: top-label confidences ``(N,)`` (with ``correct``), or
    :param curve: a precomputed
        :class:`~bayes_router.analysis.smooth_calibration.SmoothReliabilityCurve`.
    :param label: legend entry of the curve.
    """
    curve = _data_or_curve("plot_smooth_reliability_diagram", ("confidence", "correct"),
                           (confidence, correct), curve,
                           lambda: smooth_reliability_curve(confidence, correct))
    ax = _axes(ax)
    mesh = np.asarray(curve.mesh)
    density = np.asarray(curve.density)
    peak = density.max()
    if peak > 0:
        ax.fill_between(mesh, 0, DENSITY_HEIGHT * density / peak, color="gray", alpha=0.3,
                        linewidth=0, label="density of confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1)
    if curve.low is not None:
        ax.fill_between(mesh, curve.low, curve.high, color=color, alpha=0.25, linewidth=0,
                        label="95 % band")
    supported = density >= SUPPORTED_DENSITY * peak  # elsewhere the curve is mostly the eps
    ax.plot(mesh, curve.accuracy, color=color, linewidth=0.8, alpha=0.35)
    ax.plot(mesh, np.where(supported, curve.accuracy, np.nan), color=color, linewidth=1.8,
            label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.03)  # a curve at accuracy 1 stays visible above the frame
    ax.set_xlabel("confidence")
    ax.set_ylabel("smoothed accuracy")
    return ax


def plot_risk_coverage(scores=None, losses=None, *, curve: RiskCoverageCurve | None = None,
                       ax: Axes | None = None, label: str | None = None, **line) -> Axes:
    """The risk-coverage curve of selective prediction (Geifman & El-Yaniv 2017): the mean loss
    of the predictions kept, most trusted first, against the share kept.

    :param scores: uncertainty per prediction ``(N,)`` (with ``losses``), or
    :param curve: a precomputed :class:`~bayes_router.analysis.selective.RiskCoverageCurve`.
    :param label: legend entry of the line.
    :param line: further arguments of :meth:`matplotlib.axes.Axes.plot` (colour, style).
    """
    curve = _data_or_curve("plot_risk_coverage", ("scores", "losses"), (scores, losses), curve,
                           lambda: risk_coverage_curve(scores, losses))
    ax = _axes(ax)
    ax.plot(curve.coverage, curve.risk, label=label, **line)
    ax.set_xlim(0, 1)
    ax.set_xlabel("coverage (share of tokens kept)")
    ax.set_ylabel("risk of the kept tokens")
    return ax


def plot_decision_reliability(calibration: dict, ax: Axes | None = None,
                              reference: str = "the counterfactual best",
                              title: str = "routing decisions") -> Axes:
    """The reliability of routing decisions: per confidence of
    :func:`~bayes_router.analysis.evidence.decision_calibration` (the argmax weight, the
    posterior probability that the argmax is the largest), the share of tokens whose argmax
    expert is ``reference`` against the confidence, binned, with the ECE in the legend."""
    ax = _axes(ax)
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
    for i, (name, entry) in enumerate(calibration["confidence"].items()):
        curve = entry["curve"]
        filled = np.asarray(curve["count"]) > 0
        ax.plot(np.asarray(curve["confidence"])[filled], np.asarray(curve["accuracy"])[filled],
                "o-", color=f"C{i}", label=f"{name.replace('_', ' ')} (ECE {entry['ece']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence in the argmax expert",
           ylabel=f"share where it is {reference}", title=title)
    ax.legend(fontsize=7)
    return ax
