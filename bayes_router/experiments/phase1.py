"""The Phase-1 comparison: Bayesian vs prior-free routing, same code path, data, steps and seeds.

For every seed both routers are trained with identical settings on the same corpus; the table
reports per seed and as mean ± 95 % CI (Student t over seeds) the routing metrics, held-out NLL
under soft and hard routing and the timed hard-routing forward pass, beside the seed paper's
published numbers, and states for each claim whether it held in this run (paired differences
over seeds: "held" when the 95 % CI of the difference lies on the claimed side of zero).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
from scipy import stats

from bayes_router.experiments.report import report_runs
from bayes_router.experiments.runs import load_data, train_run, versions, write_json
from bayes_router.inference.train import TrainConfig
from bayes_router.models.config import TinyLMConfig

logger = logging.getLogger(__name__)

PUBLISHED = {
    "projected_flop_cost": {"bayesian": 25.1, "prior-free": 59.3},
    "routing_entropy": {"bayesian": 43.3, "prior-free": 55.8},
}

#: Non-inferiority margin for "without sacrificing task performance": relative val NLL.
NLL_MARGIN = 0.02


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


def _metric_table(runs: dict[str, list[dict]]) -> dict:
    keys = {
        "projected_flop_cost": lambda m: m["soft"]["projected_flop_cost"],
        "expected_flop_cost": lambda m: m["soft"]["expected_flop_cost"],
        "routing_entropy": lambda m: m["soft"]["routing_entropy"],
        "val_nll_soft": lambda m: m["soft"]["val_nll"],
        "val_bpc_soft": lambda m: m["soft"]["val_bpc"],
        "val_nll_hard": lambda m: m["hard"]["val_nll"],
        "val_bpc_hard": lambda m: m["hard"]["val_bpc"],
        "hard_time_ratio": lambda m: m["timing"]["time_ratio"],
    }
    table = {}
    for key, get in keys.items():
        table[key] = {}
        for router, metrics in runs.items():
            per_seed = [get(m) for m in metrics]
            table[key][router] = {"per_seed": per_seed, **mean_ci(per_seed)}
    for router, metrics in runs.items():
        shares = np.asarray([m["soft"]["expert_share"] for m in metrics])  # (seeds, L, K)
        table.setdefault("expert_share", {})[router] = {"mean": shares.mean(0).tolist(),
                                                        "per_seed": shares.tolist()}
    return table


def _claim(name: str, text: str, diffs, side: str, published=None) -> dict:
    """A claim on paired differences (Bayesian - prior-free); ``side`` is "negative"/"small"."""
    ci = mean_ci(diffs)
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
               progress: bool = True, resume: bool = True, report: bool = True) -> dict:
    """Train both routers for ``seeds`` seeds and write ``phase1.json`` and ``phase1.md``.

    Finished runs in ``out_dir`` are reused (an interrupted comparison resumes). With ``report``
    every run also gets its analysis report (calibration, uncertainty diagnostics, figures) and
    ``out_dir/comparison`` a side-by-side calibration comparison.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_train = train_cfg or default_train_config(steps)
    data = load_data(base_train, model_cfg or default_model_config())  # the model's window
    model_cfg = model_cfg or default_model_config(data.vocab_size)
    runs: dict[str, list[dict]] = {"bayesian": [], "prior-free": []}

    for seed in range(seeds):
        for router in runs:
            cfg = dataclasses.replace(base_train, router=router, seed=seed)
            run_dir = out_dir / f"{router}-seed{seed}"
            if (run_dir / "metrics.json").exists() and resume:
                saved = json.loads((run_dir / "config.json").read_text())
                wanted = json.loads(json.dumps({"model": model_cfg.to_dict(),
                                                "train": cfg.to_dict()}))
                if {k: saved.get(k) for k in wanted} != wanted:
                    raise ValueError(f"{run_dir} holds a finished run with a different "
                                     "configuration; choose another --out directory")
                logger.info("reusing finished run %s", run_dir)
                runs[router].append(json.loads((run_dir / "metrics.json").read_text()))
                continue
            partial = resume and (run_dir / "checkpoint.pt").exists()
            runs[router].append(train_run(model_cfg, cfg, run_dir, resume=partial,
                                          progress=progress, data=data))
    table = _metric_table(runs)
    margin = NLL_MARGIN * table["val_nll_soft"]["prior-free"]["mean"]
    result = {"seeds": seeds, "steps": base_train.steps, "model": model_cfg.to_dict(),
              "train": base_train.to_dict(), "table": table, "published": PUBLISHED,
              "claims": claims(table, margin), "versions": versions(),
              "runs": {r: [f"{r}-seed{s}" for s in range(seeds)] for r in runs}}
    if report:
        run_dirs = [out_dir / name for names in result["runs"].values() for name in names]
        report_runs(run_dirs, out_dir=out_dir / "comparison", progress=progress)
        result["comparison"] = "comparison/comparison.md"
    write_json(out_dir / "phase1.json", result)
    (out_dir / "phase1.md").write_text(phase1_report(result))
    return result


def _cell(entry: dict, digits: int = 1) -> str:
    if math.isnan(entry["low"]):
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def phase1_table(result: dict) -> str:
    """The comparison as a markdown table (mean [95 % CI] over seeds, published numbers)."""
    t = result["table"]
    rows = [("projected FLOP cost (%)", "projected_flop_cost", 1),
            ("expected FLOP cost (%)", "expected_flop_cost", 1),
            ("routing entropy (%)", "routing_entropy", 1),
            ("val NLL soft (nats)", "val_nll_soft", 3), ("val bpc soft", "val_bpc_soft", 3),
            ("val NLL hard (nats)", "val_nll_hard", 3), ("val bpc hard", "val_bpc_hard", 3),
            ("hard fwd time / full-only", "hard_time_ratio", 2)]
    lines = ["| metric | Bayesian | prior-free | published Bayesian | published prior-free |",
             "|---|---|---|---|---|"]
    for label, key, digits in rows:
        pub = result["published"].get(key, {})
        lines.append(f"| {label} | {_cell(t[key]['bayesian'], digits)} | "
                     f"{_cell(t[key]['prior-free'], digits)} | {pub.get('bayesian', '—')} | "
                     f"{pub.get('prior-free', '—')} |")
    return "\n".join(lines)


def phase1_report(result: dict) -> str:
    lines = ["# Phase-1 comparison: Bayesian vs prior-free routing", "",
             f"{result['seeds']} seed(s), {result['steps']} steps each, corpus "
             f"`{result['train']['dataset']}`, costs preset `{result['model']['cost_preset']}`, "
             f"beta0 = {result['train']['beta0']}, estimator `{result['train']['estimator']}`, "
             f"KL weight {result['train']['kl_weight']}. "
             "Mean [95 % CI over seeds].", "", phase1_table(result), "",
             "## Claims", "", "| claim | Bayesian − prior-free | published | verdict |",
             "|---|---|---|---|"]
    for c in result["claims"]:
        pub = c["published_difference"]
        lines.append(f"| {c['text']} | {_cell(c['difference'], 3)} | "
                     f"{'—' if pub is None else pub} | **{c['verdict']}** |")
    lines += ["", "Expert share (full/linear/local) per layer, mean over seeds:", ""]
    for router, share in result["table"]["expert_share"].items():
        lines.append(f"- {router}: " + "; ".join(
            f"layer {i}: " + "/".join(f"{s:.2f}" for s in row)
            for i, row in enumerate(share["mean"])))
    lines += ["", "Runs: " + ", ".join(f"[{r}]({r}/report.md)" for rs in result["runs"].values()
                                        for r in rs) + "."]
    if "comparison" in result:
        lines += ["", "Calibration and routing-uncertainty analysis of every run: "
                  "`<run>/analysis/report.md`; side by side: "
                  f"[{result['comparison']}]({result['comparison']})."]
    lines.append("")
    return "\n".join(lines)
