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
#: A Bayesian SVI step may cost at most this multiple of a prior-free step of the same LM.
SVI_STEP_TARGET = 1.25


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
    short, long = (fwd.get(("local", t)) for t in SCALING_SEQ_LENS)
    targets.append(_target(
        f"local_fwd_scaling_T{SCALING_SEQ_LENS[0]}_to_T{SCALING_SEQ_LENS[1]}",
        f"local fwd time T={SCALING_SEQ_LENS[1]} / T={SCALING_SEQ_LENS[0]}",
        None if short is None or long is None else long["fwd_ms"] / short["fwd_ms"],
        SCALING_TARGET, "<="))
    for i, step in enumerate(results.get("svi_step", [])):
        c = step["config"]
        targets.append(_target(
            f"svi_step_ratio_{i}", f"Bayesian / prior-free SVI step (D={c['d_model']}, "
            f"L={c['n_layers']}, T={step['seq_len']}, B={step['batch_size']})",
            step["ratio"], SVI_STEP_TARGET, "<=", primary=i == len(results["svi_step"]) - 1))
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
