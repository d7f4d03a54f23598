"""Plots return Axes holding the expected artists; empty input raises instead of drawing."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from bayes_router.analysis import (
    plot_beta0_sensitivity,
    plot_estimator_bars,
    plot_expert_share,
    plot_reliability_diagram,
    plot_routing_along_text,
    plot_routing_simplex,
    plot_uncertainty_strip,
    plot_uncertainty_vs_damage,
    reliability_curve,
)
from bayes_router.core.routing import expert_share


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def bar_geometry(ax):
    return [(p.get_x(), p.get_width(), p.get_y(), p.get_height()) for p in ax.patches]


def drawn(fig):
    """``fig`` laid out and drawn on an Agg canvas, so that its artists have window extents."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def overlapping(boxes):
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
            if boxes[i].overlaps(boxes[j])]


# ----------------------------------------------------------------------- reliability diagram

# confidences .95 .95 .62 .35 (bins 9, 9, 6, 3 of 10); correct: yes, no, yes, yes
RELIABILITY_PROBS = [[0.95, 0.05, 0.0], [0.95, 0.0, 0.05], [0.62, 0.38, 0.0], [0.35, 0.33, 0.32]]
RELIABILITY_LABELS = [0, 1, 0, 0]


def test_reliability_diagram_draws_one_bar_per_filled_bin():
    ax = plot_reliability_diagram(RELIABILITY_PROBS, RELIABILITY_LABELS, n_bins=10)
    assert isinstance(ax, Axes)
    bars = sorted(bar_geometry(ax))
    assert len(bars) == 3
    np.testing.assert_allclose([b[0] for b in bars], [0.3, 0.6, 0.9])
    np.testing.assert_allclose([b[1] for b in bars], [0.1, 0.1, 0.1])
    np.testing.assert_allclose([b[3] for b in bars], [1.0, 1.0, 0.5])  # accuracy per bin
    assert sorted(t.get_text() for t in ax.texts) == ["1", "1", "2"]  # counts
    diagonal = [line for line in ax.lines if list(line.get_xdata()) == [0, 1]]
    assert len(diagonal) == 1 and list(diagonal[0].get_ydata()) == [0, 1]


def test_reliability_diagram_from_precomputed_curve():
    curve = reliability_curve(RELIABILITY_PROBS, RELIABILITY_LABELS, n_bins=10)
    _, ax = plt.subplots()
    assert plot_reliability_diagram(curve=curve, ax=ax, label="model") is ax
    assert len(ax.patches) == 3
    assert ax.get_legend() is not None


def test_reliability_diagram_equal_mass_bars_tile_the_unit_interval():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=200)
    labels = rng.integers(0, 4, 200)
    ax = plot_reliability_diagram(probs, labels, n_bins=5, binning="equal-mass")
    bars = sorted(bar_geometry(ax))
    assert len(bars) == 5
    assert bars[0][0] == 0.0 and bars[-1][0] + bars[-1][1] == pytest.approx(1.0)
    for left, right in zip(bars, bars[1:], strict=False):
        assert left[0] + left[1] == pytest.approx(right[0])
    assert sorted(int(t.get_text()) for t in ax.texts) == [40] * 5


def test_reliability_diagram_with_nothing_to_draw():
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_reliability_diagram(np.zeros((0, 3)), np.zeros(0, dtype=int))
    curve = reliability_curve(RELIABILITY_PROBS, RELIABILITY_LABELS, n_bins=10)
    empty = type(curve)(curve.confidence * np.nan, curve.accuracy * np.nan,
                        np.zeros_like(curve.count), curve.edges)
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_reliability_diagram(curve=empty)
    with pytest.raises(ValueError, match="probs and labels, or curve"):
        plot_reliability_diagram()



def predictions(n, calibrated, classes=5, seed=0):
    """Predictions and labels: drawn from the predictions (accuracy close to confidence), or
    independent of them (accuracy about ``1 / classes`` in every bin: all bars of one height,
    where count labels used to collide)."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.normal(size=(n, classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    drawn_from = probs if calibrated else np.full_like(probs, 1.0 / classes)
    labels = (rng.random((n, 1)) > drawn_from.cumsum(1)).sum(1)
    return probs, labels


@pytest.mark.parametrize("n_bins, binning, calibrated", [
    (15, "equal-width", False), (15, "equal-width", True), (40, "equal-width", True),
    (15, "equal-mass", True)])
def test_reliability_count_labels_do_not_overlap(n_bins, binning, calibrated):
    probs, labels = predictions(20000, calibrated)
    curve = reliability_curve(probs, labels, n_bins=n_bins, binning=binning)
    fig = Figure(figsize=(3.6, 3.5))  # one panel of the report's reliability figure
    ax = plot_reliability_diagram(curve=curve, ax=fig.subplots())
    renderer = drawn(fig)
    counts = [t for t in ax.texts if t.get_text().isdigit()]  # one per labelled bin
    assert overlapping([t.get_window_extent(renderer) for t in counts]) == []
    assert all(t.get_fontsize() >= 5.5 for t in counts)
    filled = [int(n) for n in curve.count if n > 0]
    notes = [t.get_text() for t in ax.texts if t.get_gid() == "reliability-count-note"]
    if len(counts) == len(filled):  # every count written, nothing to say
        assert sorted(int(t.get_text()) for t in counts) == sorted(filled) and notes == []
    else:  # the bins too narrow for their count are said to be, with their counts' range
        assert len(notes) == 1
        assert notes[0].startswith(f"{len(filled) - len(counts)} narrow bins unlabelled")
        assert {int(t.get_text()) for t in counts} <= set(filled)
    if n_bins == 15 and binning == "equal-width":  # the report's default: every count shown
        assert len(counts) == len(filled)

# ---------------------------------------------------------------------------- strip and share


def test_uncertainty_strip_one_row_per_layer_and_escaped_characters():
    text = "ab\ncd"
    values = np.arange(15.0).reshape(3, 5)
    ax = plot_uncertainty_strip(text, torch.from_numpy(values), layer_names=["l0", "l1", "l2"])
    assert len(ax.images) == 1
    np.testing.assert_array_equal(ax.images[0].get_array(), values)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "\\n", "c", "d"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["l0", "l1", "l2"]


def test_uncertainty_strip_checks_its_input():
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_uncertainty_strip("", np.zeros((2, 0)))
    with pytest.raises(ValueError, match="3 characters"):
        plot_uncertainty_strip("abc", np.zeros((2, 4)))
    with pytest.raises(ValueError, match="layer_names"):
        plot_uncertainty_strip("abc", np.zeros((2, 3)), layer_names=["only one"])


def test_routing_along_text_colours_each_token_by_its_expert():
    experts = np.array([[0, 1, -1, -2], [2, 2, 0, -2]])  # (L, T): -1 soft, -2 not read
    uncertainty = np.array([[0.1, 0.9, 0.5, np.nan], [0.0, 1.0, 0.25, np.nan]])
    ax = plot_routing_along_text(torch.from_numpy(experts), uncertainty, text="ab\nc")
    assert len(ax.images) == 1
    image = np.asarray(ax.images[0].get_array())  # (L, T, 4) RGBA
    assert image.shape == (2, 4, 4)
    for (layer, token), code in np.ndenumerate(experts):
        expected = {-1: (0.62, 0.62, 0.62, 1.0), -2: (0.0, 0.0, 0.0, 0.0)}.get(
            code, to_rgba(f"C{code}") if code >= 0 else None)
        np.testing.assert_allclose(image[layer, token], expected)
    # one line per layer inside its row (layer - 0.5 .. layer + 0.5, the y axis downwards):
    # 0 near the bottom, 1 near the top
    assert len(ax.lines) == 2
    for layer, line in enumerate(ax.lines):
        np.testing.assert_allclose(line.get_ydata(), layer + 0.4 - 0.8 * uncertainty[layer])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "\\n", "c"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer 0", "layer 1"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "full", "linear", "local", "soft (all experts)"]


def test_routing_along_text_without_text_or_uncertainty():
    ax = plot_routing_along_text([0, 0, 1], expert_names=["a", "b"])  # (T,): one layer
    assert np.asarray(ax.images[0].get_array()).shape == (1, 3, 4) and not ax.lines
    assert ax.get_xlabel() == "token"
    ax = plot_routing_along_text([[0] * 30], text="x" * 30, max_characters=20)
    assert ax.get_xlabel() == "token"  # too long to write out
    assert all(t.get_text() != "x" for t in ax.get_xticklabels())


def test_routing_along_text_checks_its_input():
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_routing_along_text(np.zeros((2, 0)))
    with pytest.raises(ValueError, match="1-D or 2-D"):
        plot_routing_along_text(np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="got 3"):
        plot_routing_along_text([[0, 3]])  # three experts: 0, 1, 2
    with pytest.raises(ValueError, match="got -3"):
        plot_routing_along_text([[0, -3]])
    with pytest.raises(ValueError, match="integer"):
        plot_routing_along_text([[0, 0.5]])
    with pytest.raises(ValueError, match="2 characters"):
        plot_routing_along_text([[0, 1, 2]], text="ab")
    with pytest.raises(ValueError, match=r"shape of experts \(1, 3\)"):
        plot_routing_along_text([[0, 1, 2]], uncertainty=[[0.1, 0.2]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plot_routing_along_text([[0, 1]], uncertainty=[[0.1, 1.5]])
    with pytest.raises(ValueError, match="layer_names"):
        plot_routing_along_text([[0, 1]], layer_names=["a", "b"])


def test_expert_share_stacks_one_bar_per_layer_and_expert():
    share = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    ax = plot_expert_share(share)
    bars = bar_geometry(ax)
    assert len(bars) == 6  # drawn expert by expert: (full l0, full l1, linear l0, ...)
    np.testing.assert_allclose([b[3] for b in bars], share.T.ravel())
    np.testing.assert_allclose([b[2] for b in bars], [0, 0, 0.5, 0.1, 0.8, 0.7])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full", "linear", "local"]


@pytest.mark.parametrize("layers, experts", [(2, 3), (12, 8), (1, 20)])
def test_expert_share_legend_covers_no_bar(layers, experts):
    share = np.random.default_rng(layers).dirichlet(np.ones(experts), size=layers)
    fig = Figure(figsize=(4.5, 3.2))  # as the evaluation report's figure
    ax = plot_expert_share(share, ax=fig.add_subplot(),
                           expert_names=[f"expert {k}" for k in range(experts)])
    ax.set_title("expert share (gated routing)")
    renderer = drawn(fig)
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in ax.patches]
    assert len(bars) == layers * experts
    assert not any(legend.overlaps(bar) for bar in bars)
    assert fig.bbox.contains(legend.x1 - 1, legend.y0 + 1)  # and the legend is in the figure


def test_expert_share_from_routing_weights():
    abar = np.random.default_rng(1).dirichlet(np.ones(3), size=(4, 30))
    ax = plot_expert_share(abar=abar)
    heights = np.array([b[3] for b in bar_geometry(ax)]).reshape(3, 4).T  # (L, K)
    np.testing.assert_allclose(heights, expert_share(abar))
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_expert_share(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="exactly one"):
        plot_expert_share()


# ------------------------------------------------------------------------------- simplex


def test_routing_simplex_places_samples_by_barycentric_coordinates():
    samples = torch.distributions.Dirichlet(torch.tensor([2.0, 1.0, 0.5])).sample((40,))
    ax = plot_routing_simplex(samples, prior_mean=[0.2, 0.5, 0.3])
    assert len(ax.collections) == 2  # samples, prior mean
    b = samples.double().numpy()
    expected = np.stack([b[:, 1] + b[:, 2] / 2, b[:, 2] * math.sqrt(3) / 2], axis=1)
    np.testing.assert_allclose(ax.collections[0].get_offsets(), expected, atol=1e-6)
    np.testing.assert_allclose(ax.collections[1].get_offsets(),
                               [[0.5 + 0.15, 0.3 * math.sqrt(3) / 2]])
    triangle = ax.lines[0].get_xydata()
    np.testing.assert_allclose(triangle, [[0, 0], [1, 0], [0.5, math.sqrt(3) / 2], [0, 0]])
    assert sorted(t.get_text() for t in ax.texts) == ["full", "linear", "local"]


def test_routing_simplex_overlays_tokens_on_one_axes():
    rng = np.random.default_rng(2)
    ax = plot_routing_simplex(rng.dirichlet([5, 1, 1], size=30))
    plot_routing_simplex(rng.dirichlet([1, 1, 5], size=20), ax=ax, label="token 2")
    assert [len(c.get_offsets()) for c in ax.collections] == [30, 20]
    assert len(ax.lines) == 1 and len(ax.texts) == 3  # the triangle is drawn once


def test_routing_simplex_checks_its_input():
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_routing_simplex(np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"\(S, 3\)"):
        plot_routing_simplex(np.full((4, 2), 0.5))
    with pytest.raises(ValueError, match="samples"):
        plot_routing_simplex([[0.5, 0.5, 0.5]])


# ----------------------------------------------------------------------------- damage, beta0


def test_uncertainty_vs_damage_one_point_per_decile():
    rng = np.random.default_rng(3)
    uncertainty = rng.random(35)
    damage = 2 * uncertainty + rng.random(35)
    ax = plot_uncertainty_vs_damage(uncertainty, damage)
    x, y = ax.lines[-1].get_xdata(), ax.lines[-1].get_ydata()
    order = np.argsort(uncertainty)
    sizes = [4] * 5 + [3] * 5  # 35 tokens in 10 bins
    chunks = np.split(order, np.cumsum(sizes)[:-1])
    np.testing.assert_allclose(x, [uncertainty[c].mean() for c in chunks])
    np.testing.assert_allclose(y, [damage[c].mean() for c in chunks])


def test_uncertainty_vs_damage_checks_its_input():
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_uncertainty_vs_damage([], [])
    with pytest.raises(ValueError, match="same length"):
        plot_uncertainty_vs_damage([0.1, 0.2], [1.0])


def test_beta0_sensitivity_mean_line_band_and_mark():
    beta0 = np.array([10.0, 0.1, 1.0])  # unsorted on purpose
    values = np.array([[30.0, 10.0, 20.0], [50.0, 14.0, 26.0]])  # (seeds, beta0)
    ax = plot_beta0_sensitivity(beta0, values, mark=0.5)
    assert ax.get_xscale() == "log"
    line = ax.lines[0]
    np.testing.assert_allclose(line.get_xdata(), [0.1, 1.0, 10.0])
    np.testing.assert_allclose(line.get_ydata(), [12.0, 23.0, 40.0])
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1
    band_y = bands[0].get_paths()[0].vertices[:, 1]
    assert band_y.min() == pytest.approx(10.0) and band_y.max() == pytest.approx(50.0)
    assert list(ax.lines[1].get_xdata()) == [0.5, 0.5]


def test_beta0_sensitivity_from_precomputed_interval():
    ax = plot_beta0_sensitivity([0.1, 1.0], mean=[1.0, 2.0], low=[0.5, 1.5], high=[1.5, 2.5])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [1.0, 2.0])
    assert len(ax.collections) == 1
    ax = plot_beta0_sensitivity([0.1, 1.0], mean=[1.0, 2.0])
    assert len(ax.collections) == 0 and len(ax.lines) == 1


def test_beta0_sensitivity_checks_its_input():
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_beta0_sensitivity([], np.zeros((2, 0)))
    with pytest.raises(ValueError, match="beta0_values"):
        plot_beta0_sensitivity([0.0, 1.0], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="same length"):
        plot_beta0_sensitivity([0.1, 1.0], [[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="exactly one"):
        plot_beta0_sensitivity([0.1, 1.0])


def test_estimator_bars():
    names = ["trace", "mean-field", "score", "stl"]
    ax = plot_estimator_bars(names, [1e-2, 5e-3, 10.0, 1e-3], ylabel="variance")
    np.testing.assert_allclose([p.get_height() for p in ax.patches], [1e-2, 5e-3, 10.0, 1e-3])
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "variance"
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_estimator_bars([], [])
    with pytest.raises(ValueError, match="log"):
        plot_estimator_bars(["a"], [0.0])
    assert plot_estimator_bars(["a"], [-1.0], log=False).get_yscale() == "linear"
