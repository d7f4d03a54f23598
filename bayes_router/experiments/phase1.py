"""The Phase-1 comparison: Bayesian vs prior-free routing beside static baselines, same code
path, data, steps and seeds.

For every seed each router (by default the Bayesian and prior-free routers and the three
one-expert LMs ``fixed:full``, ``fixed:linear``, ``fixed:local``) is trained with identical
settings on the same corpus; the table reports per seed and as mean ± 95 % CI (Student t over
seeds) the routing metrics, held-out NLL under soft and hard routing, and the timed hard-routing
forward pass (the prefill) and decoding step at a stated context, each relative to full-only,
beside the seed paper's published numbers.

**Power check first.** The one-expert baselines say how much the routing choice can matter at
this budget: the gap between the worst and the best fixed expert's val NLL (paired over seeds).
The comparison is *powered* when that gap's 95 % CI lies above the non-inferiority margin and
its mean exceeds three times the seed-to-seed spread of val NLL (the standard deviation over
seeds, pooled over every router). Otherwise every verdict reads "underpowered": no verdict
about routing can be read where choosing the worst expert everywhere costs less than the margin
or the noise.

Each claim is then judged on paired differences over seeds: "held" when the 95 % CI of the
difference lies on the claimed side of zero (or, for non-inferiority, below the margin).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from bayes_router.analysis.study_plots import save_figure
from bayes_router.experiments.json_files import versions, write_json
from bayes_router.experiments.report import analyse_runs
from bayes_router.experiments.run_loading import load_data
from bayes_router.experiments.rundir import run_lock
from bayes_router.experiments.training_runs import train_runs
from bayes_router.inference.train_config import TrainConfig, objective_label
from bayes_router.models.config import TinyLMConfig

logger = logging.getLogger(__name__)

PUBLISHED = {
    "projected_flop_cost": {"bayesian": 25.1, "prior-free": 59.3},
    "routing_entropy": {"bayesian": 43.3, "prior-free": 55.8},
}

#: Non-inferiority margin for "without sacrificing task performance": relative val NLL.
NLL_MARGIN = 0.02
#: The routers of a Phase-1 comparison: the two learned routers and the one-expert baselines.
PHASE1_ROUTERS = ("bayesian", "prior-free", "fixed:full", "fixed:linear", "fixed:local")
#: The power check asks the best-to-worst fixed-expert gap to exceed this many seed spreads.
POWER_SPREADS = 3.0


def run_name(router: str, seed: int) -> str:
    """Folder name of a router's run: ``fixed:0.2,0.5,0.3`` -> ``fixed-0.2_0.5_0.3-seed0``."""
    return f"{router.replace(':', '-').replace(',', '_')}-seed{seed}"


def default_model_config(vocab_size: int = 98) -> TinyLMConfig:
    """The Phase-1 TinyLM: small enough to train 6 runs in minutes on 2 CPU cores."""
    return TinyLMConfig.phase1(vocab_size)


def default_train_config(steps: int = 200, seed: int = 0) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=16, seq_len=128, lr=3e-3, beta0=1.0,
                       eval_every=max(1, steps // 4), eval_batches=4,
                       checkpoint_every=max(1, steps // 2), seed=seed,
                       dataset="stdlib", dataset_max_chars=1_000_000)


def mean_ci(values, level: float = 0.95) -> dict:
    """Mean and Student-t confidence interval over seeds (NaN bounds for a single seed)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if values.size < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": int(values.size)}
    half = stats.t.ppf(0.5 + level / 2, values.size - 1) * values.std(ddof=1) / math.sqrt(
        values.size)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(values.size)}


def _oracle_keys(runs: dict[str, list[dict]]) -> dict:
    """Accessors of the per-label NLL and accuracy where every run has oracle metrics."""
    labelled = [m["soft"].get("oracle") for ms in runs.values() for m in ms]
    if not labelled or any(o is None for o in labelled):
        return {}
    labels = set.intersection(*(set(o) for o in labelled))
    keys = {}
    for label in sorted(labels):
        keys[f"oracle_{label}_nll"] = lambda m, label=label: m["soft"]["oracle"][label]["nll"]
        keys[f"oracle_{label}_accuracy"] = (
            lambda m, label=label: 100 * m["soft"]["oracle"][label]["accuracy"])
    return keys


def _surgery_keys(runs: dict[str, list[dict]]) -> dict:
    """Accessors of each layer's held-out KL and its ELBO-surgery parts (the per-token
    information and the static allocation's KL), where every run logged them."""
    elbos = [m.get("elbo", {}) for ms in runs.values() for m in ms]
    if not elbos or any("information_per_layer" not in e for e in elbos):
        return {}
    keys = {}
    for layer in range(min(len(e["kl_per_layer"]) for e in elbos)):
        for name, field in (("kl", "kl_per_layer"), ("information", "information_per_layer"),
                            ("marginal_kl", "marginal_kl_per_layer")):
            keys[f"val_{name}_layer{layer}"] = (
                lambda m, field=field, layer=layer: m["elbo"][field][layer])
    return keys


SURGERY_LABELS = {"kl": "val KL", "information": "  of which I(x; alpha)",
                  "marginal_kl": "  of which KL(qbar || p)"}


#: The range each metric can take: a confidence interval is clipped to it (a Student-t interval
#: over 2-3 seeds easily reaches past 0 % or 100 %).
METRIC_BOUNDS = {"projected_flop_cost": (0.0, 100.0), "expected_flop_cost": (0.0, 100.0),
                 "routing_entropy": (0.0, 100.0)}


def _bounds(key: str) -> tuple[float, float]:
    if key in METRIC_BOUNDS:
        return METRIC_BOUNDS[key]
    if key.endswith("_accuracy"):
        return 0.0, 100.0
    return 0.0, math.inf  # NLL, bpc, negative ELBO, KL, time ratios: non-negative


def bounded_ci(values, low: float, high: float) -> dict:
    """:func:`mean_ci` with the interval clipped to ``[low, high]`` (``clipped`` says whether it
    was)."""
    ci = mean_ci(values)
    if math.isnan(ci["low"]):
        return {**ci, "clipped": False}
    clipped = ci["low"] < low or ci["high"] > high
    return {**ci, "low": max(ci["low"], low), "high": min(ci["high"], high), "clipped": clipped}


def _metric_table(runs: dict[str, list[dict]]) -> dict:
    keys = {
        "projected_flop_cost": lambda m: m["soft"]["projected_flop_cost"],
        "expected_flop_cost": lambda m: m["soft"]["expected_flop_cost"],
        "routing_entropy": lambda m: m["soft"]["routing_entropy"],
        "val_nll_soft": lambda m: m["soft"]["val_nll"],
        "val_bpc_soft": lambda m: m["soft"]["val_bpc"],
        "val_nll_hard": lambda m: m["hard"]["val_nll"],
        "val_bpc_hard": lambda m: m["hard"]["val_bpc"],
        "val_neg_elbo": lambda m: m.get("elbo", {}).get("neg_elbo", math.nan),
        "val_kl": lambda m: m.get("elbo", {}).get("kl", math.nan),
        "hard_time_ratio": lambda m: (math.nan if m["timing"]["time_ratio"] is None
                                      else m["timing"]["time_ratio"]),
        # runs finished before decoding was timed have no decode keys
        "hard_decode_time_ratio": lambda m: (
            math.nan if m["timing"].get("decode_time_ratio") is None
            else m["timing"]["decode_time_ratio"]),
        **_surgery_keys(runs),
        **_oracle_keys(runs),
    }
    table = {}
    for key, get in keys.items():
        table[key] = {}
        for router, metrics in runs.items():
            per_seed = [get(m) for m in metrics]
            table[key][router] = {"per_seed": per_seed, **bounded_ci(per_seed, *_bounds(key))}
    for router, metrics in runs.items():
        shares = np.asarray([m["soft"]["expert_share"] for m in metrics])  # (seeds, L, K)
        table.setdefault("expert_share", {})[router] = {"mean": shares.mean(0).tolist(),
                                                        "per_seed": shares.tolist()}
    return table


def _claim(name: str, text: str, diffs, side: str, published=None) -> dict:
    """A claim on paired differences (Bayesian - prior-free); ``side`` is "negative"/"small".
    A difference with a missing (NaN) value gets "no verdict (missing data)"."""
    ci = mean_ci(diffs)
    if not np.all(np.isfinite(np.asarray(diffs, dtype=float))):
        return {"claim": name, "text": text, "difference": ci,
                "verdict": "no verdict (missing data)", "published_difference": published}
    if side == "negative":
        if ci["n"] >= 2:
            held = "held" if ci["high"] < 0 else ("direction only" if ci["mean"] < 0
                                                  else "did not hold")
        else:
            held = "direction only (1 seed)" if ci["mean"] < 0 else "did not hold"
    else:  # non-inferiority: the upper bound of the difference within the margin
        bound = ci["high"] if ci["n"] >= 2 else ci["mean"]
        held = "held" if bound <= side else "did not hold"
        if ci["n"] < 2:
            held += " (1 seed)"
    return {"claim": name, "text": text, "difference": ci, "verdict": held,
            "published_difference": published}


def power_check(table: dict, margin_nats: float, key: str = "val_nll_soft") -> dict:
    """Can this comparison tell routings apart? (see the module docstring)

    :param table: the metric table, holding at least two ``fixed:<expert>`` one-expert runs.
    :param margin_nats: the non-inferiority margin of the claims.
    :returns: ``powered``, ``reason``, the ``best`` and ``worst`` fixed expert, the paired
        ``gap`` (mean and CI), the pooled seed ``spread`` and ``gap_over_spread``.
    """
    entries = table[key]
    fixed = [r for r in entries if r.startswith("fixed:") and "," not in r]
    spreads = [np.std(e["per_seed"], ddof=1) for e in entries.values() if len(e["per_seed"]) > 1]
    spread = float(np.sqrt(np.mean(np.square(spreads)))) if spreads else math.nan
    result = {"metric": key, "margin": margin_nats, "spread": spread, "fixed": fixed,
              "spreads_required": POWER_SPREADS}
    if len(fixed) < 2:
        return {**result, "powered": False, "gap": None, "best": None, "worst": None,
                "gap_over_spread": None,
                "reason": "underpowered: the power check needs at least two one-expert "
                          "baselines (fixed:<expert>)"}
    best = min(fixed, key=lambda r: entries[r]["mean"])
    worst = max(fixed, key=lambda r: entries[r]["mean"])
    gap = mean_ci(np.subtract(entries[worst]["per_seed"], entries[best]["per_seed"]))
    ratio = gap["mean"] / spread if spread and math.isfinite(spread) else math.nan
    result.update(best=best, worst=worst, gap=gap, gap_over_spread=ratio)
    text = (f"{worst} is worse than {best} by {gap['mean']:.3f} nats")
    if gap["n"] < 2:
        return {**result, "powered": False,
                "reason": f"underpowered: {text} on a single seed (no seed-to-seed spread)"}
    text += (f" [95 % CI {gap['low']:.3f}, {gap['high']:.3f}], {ratio:.1f} x the seed spread "
             f"{spread:.4f}; margin {margin_nats:.3f}")
    powered = gap["low"] > margin_nats and ratio > POWER_SPREADS
    return {**result, "powered": bool(powered),
            "reason": ("powered: " if powered else "underpowered: ") + text}


def claims(table: dict, nll_margin_nats: float) -> list[dict]:
    def diffs(key):
        b = np.asarray(table[key]["bayesian"]["per_seed"])
        p = np.asarray(table[key]["prior-free"]["per_seed"])
        return b - p

    return [
        _claim("projected_flop_cost", "Bayesian routing has lower projected FLOP cost "
               "(published 25.1 % vs 59.3 %)", diffs("projected_flop_cost"), "negative", -34.2),
        _claim("routing_entropy", "Bayesian routing has lower routing entropy "
               "(published 43.3 % vs 55.8 %)", diffs("routing_entropy"), "negative", -12.5),
        _claim("val_nll_soft", f"no loss of task performance (soft val NLL within "
               f"{nll_margin_nats:.3f} nats)", diffs("val_nll_soft"), nll_margin_nats),
        _claim("val_nll_hard", f"no loss of task performance under hard routing (within "
               f"{nll_margin_nats:.3f} nats)", diffs("val_nll_hard"), nll_margin_nats),
    ]


def run_phase1(out_dir: Path, seeds: int = 3, steps: int = 300,
               model_cfg: TinyLMConfig | None = None, train_cfg: TrainConfig | None = None,
               progress: bool = True, resume: bool = True, report: bool = True,
               routers: tuple[str, ...] = PHASE1_ROUTERS, jobs: int = 1, first_seed: int = 0,
               eval_batches: int | None = None, device: str = "cpu") -> dict:
    """Train every router for ``seeds`` seeds and write ``phase1.json``, ``phase1.md`` and
    ``quality_vs_compute.png``.

    Finished runs in ``out_dir`` are reused (an interrupted comparison resumes). With ``report``
    the Bayesian and prior-free runs also get their analysis reports (calibration, uncertainty
    diagnostics, figures) and ``out_dir/comparison`` a side-by-side calibration comparison.

    :param routers: router specs (see :class:`~bayes_router.inference.train_config.TrainConfig`);
        the claims need ``bayesian`` and ``prior-free``, the power check two ``fixed:<expert>``.
    :param jobs: parallel worker processes (one torch thread each).
    :param eval_batches: validation batches of the final metrics (``None``: the whole split).
    :param device: where every run trains (see
        :func:`~bayes_router.inference.distributed.resolve_device`).
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    routers = tuple(routers)
    if not routers or len(set(routers)) != len(routers):
        raise ValueError(f"routers must name at least one router, each once; got {routers}")
    out_dir = Path(out_dir)
    base_train = train_cfg or default_train_config(steps)
    data = load_data(base_train, model_cfg or default_model_config())  # the model's window
    model_cfg = model_cfg or default_model_config(data.vocab_size)
    seed_list = list(range(first_seed, first_seed + seeds))
    specs = [(model_cfg, dataclasses.replace(base_train, router=router, seed=seed),
              out_dir / run_name(router, seed)) for router in routers for seed in seed_list]
    with run_lock(out_dir):
        return _phase1(out_dir, specs, routers, seeds, seed_list, model_cfg, base_train, data,
                       progress, resume, report, jobs, eval_batches, device)


def _phase1(out_dir, specs, routers, seeds, seed_list, model_cfg, base_train, data, progress,
            resume, report, jobs, eval_batches, device) -> dict:
    metrics = train_runs(specs, jobs=jobs, progress=progress, resume=resume, data=data,
                         eval_batches=eval_batches, device=device)
    runs = {router: [metrics[i * seeds + j] for j in range(seeds)]
            for i, router in enumerate(routers)}
    table = _metric_table(runs)
    reference = "prior-free" if "prior-free" in routers else routers[0]
    margin = NLL_MARGIN * table["val_nll_soft"][reference]["mean"]
    power = power_check(table, margin)
    verdicts = (claims(table, margin) if {"bayesian", "prior-free"} <= set(routers) else [])
    if not power["powered"]:
        for claim in verdicts:
            claim["verdict_if_powered"], claim["verdict"] = claim["verdict"], "underpowered"
    result = {"seeds": seeds, "seed_list": seed_list, "steps": base_train.steps,
              "routers": list(routers), "model": model_cfg.to_dict(),
              "train": base_train.to_dict(), "objective": objective_label(base_train),
              "table": table, "decode": decode_conditions(runs), "published": PUBLISHED,
              "power": power, "claims": verdicts,
              "versions": versions(),
              "runs": {r: [run_name(r, s) for s in seed_list] for r in routers}}
    result["figure"] = save_figure(quality_figure(result), out_dir / "quality_vs_compute.png")
    learned = [r for r in ("bayesian", "prior-free") if r in routers]
    if report and learned:
        run_dirs = [out_dir / name for r in learned for name in result["runs"][r]]
        analyse_runs(run_dirs, out_dir=out_dir / "comparison", progress=progress)
        result["comparison"] = "comparison/comparison.md"
    write_json(out_dir / "phase1.json", result)
    (out_dir / "phase1.md").write_text(phase1_report(result))
    return result


def decode_conditions(runs: dict[str, list[dict]]) -> dict:
    """The contexts, steps, batch sizes and reference experts with which the runs' decoding
    steps were timed (one of each when every run shares the model, as in a Phase-1 comparison;
    empty lists for runs finished before decoding was timed)."""
    timings = [m["timing"] for ms in runs.values() for m in ms
               if m["timing"].get("decode_time_ratio") is not None]
    return {key: sorted({t[f"decode_{key}"] for t in timings})
            for key in ("context", "steps", "batch", "reference")}


def decode_axis_label(result: dict) -> str:
    """``hard decoding step / full-only, context 120``: the realised decode compute."""
    contexts = result.get("decode", {}).get("context", [])
    where = ", context " + "/".join(str(c) for c in contexts) if contexts else ""
    return f"hard decoding step time / full-only{where}"


def quality_figure(result: dict) -> Figure:
    """Quality against compute: every router and baseline a point (mean over seeds, 95 % CI
    bars): val NLL under hard routing against the projected FLOP cost, against the timed
    forward pass (the prefill) relative to full-only and, where the runs timed it, against the
    timed decoding step relative to full-only at the stated context."""
    table = result["table"]
    panels = [("projected_flop_cost", "projected FLOP cost (%)",
               "quality vs projected compute"),
              ("hard_time_ratio", "hard forward (prefill) time / full-only",
               "quality vs realised compute: prefill")]
    decode = table.get("hard_decode_time_ratio", {})
    if any(math.isfinite(e["mean"]) for e in decode.values()):
        panels.append(("hard_decode_time_ratio", decode_axis_label(result),
                       "quality vs realised compute: decoding"))
    fig = Figure(figsize=(5 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels))
    for ax, (key, label, title) in zip(axes, panels, strict=True):
        for i, router in enumerate(result["routers"]):
            x, y = table[key][router], table["val_nll_hard"][router]
            if not math.isfinite(x["mean"]):
                continue

            def half(e):
                return 0.0 if math.isnan(e["low"]) else (e["high"] - e["low"]) / 2

            ax.errorbar(x["mean"], y["mean"], xerr=half(x), yerr=half(y), fmt="o",
                        color=f"C{i}", capsize=3, label=router)
        ax.set(xlabel=label, ylabel="val NLL, hard routing (nats)", title=title)
    axes[0].legend(fontsize=7)
    return fig


def _cell(entry: dict, digits: int = 1) -> str:
    if not math.isfinite(entry["mean"]):
        return "—"
    if math.isnan(entry["low"]):
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


TABLE_ROWS = (("projected FLOP cost (%)", "projected_flop_cost", 1),
              ("expected FLOP cost (%)", "expected_flop_cost", 1),
              ("routing entropy (%)", "routing_entropy", 1),
              ("val NLL soft (nats)", "val_nll_soft", 3), ("val bpc soft", "val_bpc_soft", 3),
              ("val NLL hard (nats)", "val_nll_hard", 3), ("val bpc hard", "val_bpc_hard", 3),
              ("val negative ELBO (nats/token)", "val_neg_elbo", 3),
              ("val KL (nats/token, all layers)", "val_kl", 4),
              ("hard fwd time / full-only", "hard_time_ratio", 2),
              ("hard decode step / full-only", "hard_decode_time_ratio", 2))


def phase1_table(result: dict) -> str:
    """The comparison as a markdown table: one column per router (mean [95 % CI] over seeds),
    the published numbers last; per-label rows for a synthetic task."""
    t, routers = result["table"], result["routers"]
    synthetic = str(result.get("train", {}).get("dataset", "")).startswith("synthetic:")
    # a synthetic task has tokens, not characters: its bits are the NLL rows over log 2
    rows = [row for row in TABLE_ROWS if not (synthetic and "bpc" in row[1])] + [
        (f"{SURGERY_LABELS[key[4:].rsplit('_layer', 1)[0]]} layer {key.rsplit('layer', 1)[1]} "
         "(nats/token)", key, 4)
        for key in t if key.startswith("val_") and "_layer" in key] + [
        (f"oracle '{key.split('_')[1]}' targets: "
         + ("accuracy (%)" if key.endswith("accuracy") else "NLL (nats)"),
         key, 1 if key.endswith("accuracy") else 3)
        for key in t if key.startswith("oracle_")]
    lines = ["| metric | " + " | ".join(routers) + " | published Bayesian | published "
             "prior-free |", "|---|" + "---|" * (len(routers) + 2)]
    for label, key, digits in rows:
        pub = result["published"].get(key, {})
        lines.append(f"| {label} | " + " | ".join(_cell(t[key][r], digits) for r in routers)
                     + f" | {pub.get('bayesian', '—')} | {pub.get('prior-free', '—')} |")
    return "\n".join(lines)


def decode_note(result: dict) -> str:
    """What the two time ratios of the table measure, with the decoding step's context."""
    decode = {key: "/".join(str(v) for v in values)
              for key, values in result.get("decode", {}).items()}
    text = ("Time ratios: the hard-routed forward pass over a validation batch (the prefill) "
            "over the same pass with every token on full")
    if not decode.get("context"):
        return text + "; no decoding step was timed by these runs."
    return (text + f"; a hard-routed decoding step from a cache of {decode['context']} "
            f"validation tokens ({decode['batch']} sequences, {decode['steps']} teacher-forced "
            f"steps per timed call) over the same step with every token on "
            f"{decode['reference']}, interleaved.")


def phase1_report(result: dict) -> str:
    train = result["train"]
    power = result["power"]
    lines = ["# Phase-1 comparison: Bayesian vs prior-free routing beside static baselines", "",
             f"{result['seeds']} seed(s) ({result['seed_list']}), {result['steps']} steps each, "
             f"corpus `{train['dataset']}`, costs preset `{result['model']['cost_preset']}`, "
             f"prior `{train['prior']}` (mean {train['prior_mean']}), beta0 = {train['beta0']}, "
             f"estimator `{train['estimator']}`, KL weight {train['kl_weight']}, free bits "
             f"{train['free_bits']}; the Bayesian objective: **{result['objective']}**. "
             "Mean [95 % CI over seeds, clipped to the metric's range]."
             + (" **With fewer than 3 seeds the intervals are uninformative** (Student t with 1 "
                "degree of freedom has t = 12.7)." if result["seeds"] < 3 else ""), "",
             f"**Power check: {power['reason']}.**", "", phase1_table(result), "",
             decode_note(result), "", "![quality vs compute](quality_vs_compute.png)", ""]
    if result["claims"]:
        lines += ["## Claims", "", "| claim | Bayesian − prior-free | published | verdict |",
                  "|---|---|---|---|"]
        for c in result["claims"]:
            pub = c["published_difference"]
            verdict = c["verdict"] + (f" (if powered: {c['verdict_if_powered']})"
                                      if "verdict_if_powered" in c else "")
            lines.append(f"| {c['text']} | {_cell(c['difference'], 3)} | "
                         f"{'—' if pub is None else pub} | **{verdict}** |")
        lines.append("")
    experts = "/".join(result["model"]["experts"])
    lines += [f"Expert share ({experts}) per layer, mean over seeds:", ""]
    for router, share in result["table"]["expert_share"].items():
        lines.append(f"- {router}: " + "; ".join(
            f"layer {i}: " + "/".join(f"{s:.2f}" for s in row)
            for i, row in enumerate(share["mean"])))
    lines += ["", "Runs: " + ", ".join(f"[{r}]({r}/report.md)" for rs in result["runs"].values()
                                        for r in rs) + "."]
    if "comparison" in result:
        lines += ["", "Calibration and routing-uncertainty analysis of the learned routers: "
                  "`<run>/analysis/report.md`; side by side: "
                  f"[{result['comparison']}]({result['comparison']})."]
    lines.append("")
    return "\n".join(lines)
