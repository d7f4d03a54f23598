"""The speed targets of the benchmark: each a threshold on one measured ratio, checked against a
run's results (:func:`check_targets`)."""

from __future__ import annotations

# speed targets: (expert fraction of matmul throughput, length), local scaling, hard-layer slack
THROUGHPUT_TARGET = 0.40
THROUGHPUT_TARGET_SEQ_LEN = 2048
SCALING_SEQ_LENS = (2048, 4096)
SCALING_TARGET = 2.5
HARD_MIX_TARGET = (0.25, 0.5, 0.25)
HARD_SLACK_TARGET = 1.3
#: At these short lengths the hard layer may cost at most SHORT_TARGET x full-only at any mix.
SHORT_SEQ_LENS = (128, 256, 512)
SHORT_TARGET = 1.1
#: A Bayesian SVI step may cost at most this multiple of a prior-free step of the same LM.
SVI_STEP_TARGET = 1.15
#: A prior-free step may cost at most this multiple of a plain causal LM's step (time, memory).
PLAIN_STEP_TARGET = 1.5
PLAIN_MEMORY_TARGET = 1.3
#: The local expert must be at least as fast as compiled flex_attention: flex / local >= 1.
FLEX_TARGET = 1.0


def _target(name: str, description: str, value: float | None, threshold: float,
            comparison: str, **extra) -> dict:
    passed = None
    if value is not None:
        passed = bool(value >= threshold) if comparison == ">=" else bool(value <= threshold)
    return {"name": name, "description": description, "value": value, "threshold": threshold,
            "comparison": comparison, "passed": passed, **extra}


def check_targets(results: dict) -> list[dict]:
    """The speed targets, each ``{"name", "description", "value", "comparison", "threshold",
    "passed"}`` (``passed`` iff ``value <comparison> threshold``).

    ``passed`` is ``None`` when the run did not measure what a target needs (e.g. ``T = 2048``
    missing from ``seq_lens``, or the 25/50/25 mix missing from ``mixes``).
    """
    fwd = {(r["expert"], r["seq_len"]): r for r in results["experts"]}
    targets = []
    for name in ("full", "local"):
        row = fwd.get((name, THROUGHPUT_TARGET_SEQ_LEN))
        targets.append(_target(
            f"{name}_fwd_throughput_T{THROUGHPUT_TARGET_SEQ_LEN}",
            f"{name} fwd at T={THROUGHPUT_TARGET_SEQ_LEN}: fraction of matmul GFLOP/s",
            None if row is None else row["fwd_fraction_of_matmul"], THROUGHPUT_TARGET, ">="))
    # the two lengths timed in one round-robin where the run did so, else the expert rows
    scaling = results.get("local_scaling")
    short, long = (fwd.get(("local", t)) for t in SCALING_SEQ_LENS)
    if scaling is not None:
        ratio = scaling["ratio"]
    else:
        ratio = None if short is None or long is None else long["fwd_ms"] / short["fwd_ms"]
    targets.append(_target(
        f"local_fwd_scaling_T{SCALING_SEQ_LENS[0]}_to_T{SCALING_SEQ_LENS[1]}",
        f"local fwd time T={SCALING_SEQ_LENS[1]} / T={SCALING_SEQ_LENS[0]}"
        + (" (one round-robin)" if scaling is not None else ""),
        ratio, SCALING_TARGET, "<="))
    short = results.get("hard_layer_short") or []
    if short:
        worst = max(short, key=lambda r: r["fwd_ratio"])
        targets.append(_target(
            "hard_layer_short_worst",
            f"hard layer fwd / full-only, worst over T in {sorted({r['seq_len'] for r in short})}"
            f" and every mix measured (worst: T={worst['seq_len']}, mix "
            f"{'/'.join(f'{v:g}' for v in worst['mix'])})", worst["fwd_ratio"], SHORT_TARGET,
            "<="))
    baselines = results.get("local_baselines") or {}
    if baselines:
        targets.append(_target(
            f"local_vs_flex_T{baselines['seq_len']}",
            f"compiled flex_attention fwd / local fwd at T={baselines['seq_len']}",
            baselines.get("flex_over_local"), FLEX_TARGET, ">="))
    for i, step in enumerate(results.get("svi_step", [])):
        c = step["config"]
        size = (f"D={c['d_model']}, L={c['n_layers']}, T={step['seq_len']}, "
                f"B={step['batch_size']}")
        primary = i == len(results["svi_step"]) - 1
        targets.append(_target(
            f"svi_step_ratio_{i}", f"Bayesian / prior-free SVI step ({size})",
            step["ratio"], SVI_STEP_TARGET, "<=", primary=primary))
        if "prior_free_over_plain" in step:
            targets.append(_target(
                f"prior_free_over_plain_{i}", f"prior-free step / plain causal LM step ({size})",
                step["prior_free_over_plain"], PLAIN_STEP_TARGET, "<="))
        if "prior_free_memory_over_plain" in step:
            targets.append(_target(
                f"prior_free_memory_over_plain_{i}",
                f"prior-free / plain LM peak training memory ({size})",
                step["prior_free_memory_over_plain"], PLAIN_MEMORY_TARGET, "<="))
    mix = next((m for m in results["hard_layer"]["mixes"]
                if tuple(m["mix"]) == HARD_MIX_TARGET), None)
    for basis in ("with_projections", "attention_core"):
        targets.append(_target(
            f"hard_layer_fwd_vs_projected_{basis}",
            f"hard layer fwd at mix {'/'.join(f'{s:g}' for s in HARD_MIX_TARGET)}: "
            f"measured_ratio / projected_cost_{basis}",
            None if mix is None else mix["fwd_ratio"] / mix[f"projected_cost_{basis}"],
            HARD_SLACK_TARGET, "<=", primary=basis == "with_projections"))
    return targets
