"""The gate sweep of one trained run: held-out NLL against the measured decoding step as the
gate threshold moves, for the router's uncertainty gate and the random gate at the same soft
fraction (``bayes-router gate-sweep``).

At each threshold of each uncertainty measure (``total`` and ``epistemic`` for a Bayesian run,
``total``, the softmax's entropy, for a prior-free one) the run is evaluated under gated
routing on the first validation windows. By default the thresholds are the quantiles of the
measure's own values on those windows at the asked soft fractions (a router near its prior
gives every token nearly the same uncertainty, and fixed thresholds then jump from all soft
to all hard); its soft fraction ``s`` (the share of layer-token
decisions left soft) sets the threshold ``1 - s`` of the random gate, which sends the same
share soft at random. Both are timed as decoding steps against the same model with every token
on ``full`` (:func:`~bayes_router.experiments.run_evaluation.decode_timing`). If the router's
uncertainty knows which tokens need the soft mixture, its curve lies below the random gate's at
equal soft fraction; the decoding step says what each point costs. Writes ``gate_sweep.json``,
``gate_sweep.png`` and ``report.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pyro
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from bayes_router.analysis.study_plots import save_figure
from bayes_router.core.validation import check_int
from bayes_router.experiments.json_files import versions, write_json
from bayes_router.experiments.run_evaluation import check_eval_length, decode_timing
from bayes_router.experiments.run_loading import check_run_dir, load_run_dir
from bayes_router.inference.evaluate import evaluate
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.prior_free import PriorFreeRoutedLM

logger = logging.getLogger(__name__)

DEFAULT_SOFT_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def _check(thresholds: Sequence[float] | None, soft_fractions: Sequence[float],
           eval_batches: int, repeats: int) -> tuple[float, ...] | None:
    for name, values in (("thresholds", thresholds), ("soft_fractions", soft_fractions)):
        if values is not None and (not len(values) or not all(0.0 <= float(t) <= 1.0
                                                              for t in values)):
            raise ValueError(f"{name} must be numbers in [0, 1], got {list(values)}")
    thresholds = None if thresholds is None else tuple(float(t) for t in thresholds)
    check_int("eval_batches", eval_batches)
    check_int("repeats", repeats)
    return thresholds


def gate_sweep(run_dir: Path, out_dir: Path | None = None,
               thresholds: Sequence[float] | None = None,
               soft_fractions: Sequence[float] = DEFAULT_SOFT_FRACTIONS, eval_batches: int = 8,
               repeats: int = 5, seed: int = 0, progress: bool = True,
               seq_len: int | None = None) -> dict:
    """Sweep the gate threshold of a Bayesian or prior-free run (see the module docstring);
    writes into ``out_dir`` (default ``RUN_DIR/gate-sweep``).

    :param thresholds: gate thresholds on the normalised uncertainty, in ``[0, 1]``, the same
        for every measure; ``None``: each measure's quantiles at ``soft_fractions``.
    :param soft_fractions: the shares of decisions to leave soft (``thresholds=None``).
    :param eval_batches: validation batches of 16 windows behind each NLL.
    :param repeats: timed calls of each decoding step.
    :param seed: seed of the random gate's draws (the same draws at every point).
    :param seq_len: tokens per validation window, and the decoding context they leave
        (default: the run's training length; past ``max_seq_len`` with rotary positions only,
        see :func:`~bayes_router.experiments.run_evaluation.check_eval_length`).
    """
    thresholds = _check(thresholds, soft_fractions, eval_batches, repeats)
    run_dir = check_run_dir(run_dir)
    out_dir = run_dir / "gate-sweep" if out_dir is None else Path(out_dir)
    with pyro.settings.context(module_local_params=True):
        model, model_cfg, train_cfg, _, data = load_run_dir(run_dir)
        if not isinstance(model, BayesianRoutedLM | PriorFreeRoutedLM):
            raise ValueError(f"the gate sweep needs a learned router (bayesian or prior-free); "
                             f"{run_dir} holds a {train_cfg.router!r} run, whose uncertainty "
                             f"is the same for every token")
        length = train_cfg.seq_len if seq_len is None else check_eval_length(
            seq_len, model, data, "val")
        measures = ("total", "epistemic") if isinstance(model, BayesianRoutedLM) else ("total",)
        per_measure = {m: thresholds if thresholds is not None else _quantile_thresholds(
            model, data, length, eval_batches, m, soft_fractions) for m in measures}
        points = []
        bar = tqdm(total=2 * sum(len(t) for t in per_measure.values()), desc="gate sweep",
                   disable=not progress)

        def point(gate: str, threshold: float, measure: str, matched: str | None) -> dict:
            torch.manual_seed(seed)  # the random gate draws from torch's stream
            metrics = evaluate(model, data, "val", length, mode="gated",
                               gate_threshold=threshold, max_batches=eval_batches,
                               gate_measure=measure)
            timing = decode_timing(model, data, "val", length, "gated", threshold, repeats,
                                   gate_measure=measure,
                                   length=None if length == train_cfg.seq_len else length)
            bar.update()
            return {"gate": gate, "measure": measure, "matched_to": matched,
                    "threshold": threshold, "soft_fraction": 1.0 - metrics["hard_fraction"],
                    "val_nll": metrics["val_nll"], "val_bpc": metrics["val_bpc"],
                    "tokens": metrics["tokens"],
                    "expected_flop_cost": metrics["expected_flop_cost"],
                    "decode_time_ratio": timing.get("decode_time_ratio"),
                    "decode_step_ms": timing.get("decode_step_ms"),
                    "decode_context": timing.get("decode_context")}

        for measure in measures:
            for threshold in per_measure[measure]:
                gated = point(measure, threshold, measure, None)
                points.append(gated)
                points.append(point("random", 1.0 - gated["soft_fraction"], "random", measure))
        bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"run_dir": str(run_dir), "router": train_cfg.router, "corpus": train_cfg.dataset,
              "experts": list(model_cfg.experts),
              "thresholds": {m: list(t) for m, t in per_measure.items()},
              "soft_fractions": None if thresholds is not None else list(soft_fractions),
              "measures": list(measures), "eval_batches": eval_batches,
              "seq_len": length, "train_seq_len": train_cfg.seq_len, "repeats": repeats,
              "seed": seed,
              "points": points, "versions": versions()}
    save_figure(gate_sweep_figure(result), out_dir / "gate_sweep.png")
    write_json(out_dir / "gate_sweep.json", result)
    (out_dir / "report.md").write_text(gate_sweep_report(result))
    return result


@torch.no_grad()
def _quantile_thresholds(model, data, seq_len: int, eval_batches: int, measure: str,
                         soft_fractions: Sequence[float]) -> tuple[float, ...]:
    """Thresholds that leave about ``soft_fractions`` of the layer-token decisions soft on the
    sweep's validation windows: the ``1 - s`` quantiles of the measure's values (a decision is
    soft where its uncertainty reaches the threshold; 1 leaves none soft, 0 all)."""
    values = []
    for i, (x, _) in enumerate(data.eval_batches("val", 16, seq_len)):
        if i == eval_batches:
            break
        out = model.predict(x, "gated", 1.0, measure)
        values += [r.decision.uncertainty.flatten().double() for r in out.routing]
    values = torch.cat(values)
    return tuple(0.0 if s >= 1.0 else 1.0 if s <= 0.0 else
                 float(torch.quantile(values, 1.0 - s).clamp(0.0, 1.0)) for s in soft_fractions)


def _curves(result: dict):
    """``(label, points sorted by soft fraction)`` per gate: each measure's, then the random
    gate matched to it."""
    for measure in result["measures"]:
        mine = [p for p in result["points"] if p["gate"] == measure]
        matched = [p for p in result["points"] if p["matched_to"] == measure]
        yield f"{measure} uncertainty", sorted(mine, key=lambda p: p["soft_fraction"])
        yield f"random (matched to {measure})", sorted(matched, key=lambda p: p["soft_fraction"])


def gate_sweep_figure(result: dict) -> Figure:
    """Validation NLL against the soft fraction and against the decoding step (over
    full-only), one line per gate."""
    fig = Figure(figsize=(10, 3.8))
    ax_soft, ax_time = fig.subplots(1, 2)
    for i, (label, pts) in enumerate(_curves(result)):
        style = dict(marker="o", ms=3, label=label, color=f"C{i // 2}",
                     ls="--" if label.startswith("random") else "-")
        ax_soft.plot([p["soft_fraction"] for p in pts], [p["val_nll"] for p in pts], **style)
        timed = [p for p in pts if p["decode_time_ratio"] is not None]
        ax_time.plot([p["decode_time_ratio"] for p in timed], [p["val_nll"] for p in timed],
                     **style)
    context = next((p["decode_context"] for p in result["points"] if p["decode_context"]), None)
    ax_soft.set(xlabel="soft fraction (layer-token decisions)", ylabel="val NLL (nats/token)",
                title=f"{result['router']}: quality against the gate")
    ax_time.set(xlabel=f"decoding step / full-only, context {context}",
                ylabel="val NLL (nats/token)", title="quality against decoding time")
    ax_soft.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _tokens(result: dict) -> str:
    """The tokens behind each NLL (the same windows at every point)."""
    counts = {p.get("tokens") for p in result["points"]}
    return "?" if None in counts or len(counts) != 1 else str(counts.pop())


def gate_sweep_report(result: dict) -> str:
    """The sweep as markdown: one table per uncertainty measure beside its random control."""
    lines = [f"# Gate sweep: {result['router']} run", "",
             f"Run `{result['run_dir']}` (corpus {result['corpus']}); validation NLL on "
             f"{_tokens(result)} tokens in windows of {result['seq_len']} (at most "
             f"{result['eval_batches']} batches of 16 windows); "
             f"decoding steps timed against every token on `full` ({result['repeats']} calls, "
             f"median). The random gate sends the same share of decisions soft as the "
             f"uncertainty gate beside it, at random (seed {result['seed']}).", ""]
    for measure in result["measures"]:
        lines += [f"## {measure} uncertainty", "",
                  "| threshold | soft fraction | val NLL | decode / full-only | random: soft "
                  "fraction | random: val NLL | random: decode / full-only |",
                  "|---|---|---|---|---|---|---|"]
        mine = [p for p in result["points"] if p["gate"] == measure]
        matched = [p for p in result["points"] if p["matched_to"] == measure]
        for p, r in zip(mine, matched, strict=True):
            lines.append(f"| {p['threshold']:.2f} | {_fmt(p['soft_fraction'])} | "
                         f"{_fmt(p['val_nll'], 4)} | {_fmt(p['decode_time_ratio'])} | "
                         f"{_fmt(r['soft_fraction'])} | {_fmt(r['val_nll'], 4)} | "
                         f"{_fmt(r['decode_time_ratio'])} |")
        lines.append("")
    lines += ["![gate sweep](gate_sweep.png)", ""]
    return "\n".join(lines)
