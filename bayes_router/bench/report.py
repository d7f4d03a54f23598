"""The benchmark's table, ``report.md`` and figure."""

from __future__ import annotations

from matplotlib.figure import Figure

from bayes_router.analysis.study_plots import plot_bench_experts, plot_bench_hard_layer


def _format_load(load: float | None) -> str:
    return "n/a" if load is None else f"{load:.2f}"


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_table(results: dict) -> str:
    """A fixed-width text rendering of :func:`run_benchmark`'s results."""
    env, cfg, mm = results["environment"], results["config"], results["matmul"]
    lines = [
        f"torch {env['torch']}, {env['num_threads']} threads, {env['processor']} "
        f"({env['platform']})",
        f"fp32 matmul {mm['size']}x{mm['size']}: {mm['gflops']:.1f} GFLOP/s; 1-min load average "
        f"{_format_load(env.get('load_average_1min'))} before, "
        f"{_format_load(env.get('load_average_1min_after'))} after",
        "",
        f"Attention core, causal: B={cfg['batch']} H={cfg['n_heads']} D={cfg['d_model']} "
        f"w={cfg['window']} chunk={cfg['chunk_size']}  (fwd+bwd GFLOP/s use 3 x fwd FLOPs)",
        f"{'expert':<7}{'T':>6}{'fwd ms':>10}{'GFLOP/s':>9}{'%mm':>6}"
        f"{'f+b ms':>10}{'GFLOP/s':>9}{'%mm':>6}{'naive ms':>10}",
    ]
    naive = {(r["expert"], r["seq_len"]): r["fwd_ms"] for r in results["naive"]}
    for r in results["experts"]:
        naive_ms = naive.get((r["expert"], r["seq_len"]))
        lines.append(
            f"{r['expert']:<7}{r['seq_len']:>6}{r['fwd_ms']:>10.2f}{r['fwd_gflops']:>9.1f}"
            f"{100 * r['fwd_fraction_of_matmul']:>6.0f}{r['fwd_bwd_ms']:>10.2f}"
            f"{r['fwd_bwd_gflops']:>9.1f}{100 * r['fwd_bwd_fraction_of_matmul']:>6.0f}"
            + (f"{naive_ms:>10.2f}" if naive_ms is not None else f"{'-':>10}"))
    hard = results["hard_layer"]
    lines += [
        "",
        f"Hard-routed layer (RoutedAttention, shared q/k/v/out, sparse=True), T={hard['seq_len']}: "
        f"full-only {hard['full_only_fwd_ms']:.1f} ms fwd, {hard['full_only_fwd_bwd_ms']:.1f} ms "
        f"fwd+bwd; soft (all experts dense) {hard['soft_fwd_ms']:.1f} ms fwd "
        f"({hard['soft_fwd_ratio']:.2f}x)",
        "ratio = time / full-only time; projected = sum_k share_k c_k (core: attention only; "
        "+proj: with q/k/v/out)",
        "timed = the mix at each expert's dense speed (dense cores timed on the layer's heads: "
        + ", ".join(f"{n} {ms:.1f} ms" for n, ms in hard["dense_core_fwd_ms"].items()) + ")",
        f"{'full/linear/local':<19}{'fwd ms':>9}{'ratio':>7}{'f+b ms':>9}{'ratio':>7}"
        f"{'proj core':>11}{'proj +proj':>12}{'timed':>8}",
    ]
    for r in hard["mixes"]:
        mix = "/".join(f"{s:.2f}" for s in r["mix"])
        lines.append(
            f"{mix:<19}{r['fwd_ms']:>9.1f}{r['fwd_ratio']:>7.2f}{r['fwd_bwd_ms']:>9.1f}"
            f"{r['fwd_bwd_ratio']:>7.2f}{r['projected_cost_attention_core']:>11.3f}"
            f"{r['projected_cost_with_projections']:>12.3f}{r['projected_cost_timed']:>8.3f}")
    if results.get("hard_layer_short"):
        lines += ["", "Hard-routed layer at short lengths, fwd time / full-only (same round-robin "
                  "per length): " + "; ".join(
                      f"T={r['seq_len']} {'/'.join(f'{v:g}' for v in r['mix'])}: "
                      f"{r['fwd_ratio']:.2f}" for r in results["hard_layer_short"])]
    scaling = results.get("local_scaling")
    if scaling:
        (t0, t1), (ms0, ms1) = scaling["seq_lens"], scaling["fwd_ms"]
        lines += ["", f"Local fwd at T={t0} and T={t1} in one round-robin: {ms0:.2f} and "
                  f"{ms1:.2f} ms, ratio {scaling['ratio']:.2f}"]
    baselines = results.get("local_baselines") or {}
    if baselines:
        def ms(value):
            return "n/a" if value is None else f"{value:.2f} ms"
        lines += ["", f"Local attention at T={baselines['seq_len']}, fwd (same round-robin): "
                  f"toolkit {ms(baselines['local_fwd_ms'])}, banded SDPA "
                  f"{ms(baselines['sdpa_banded_fwd_ms'])}, compiled flex_attention "
                  f"{ms(baselines.get('flex_fwd_ms'))}"
                  + (f" (compiled in {baselines['flex_compile_seconds']:.0f} s)"
                     if baselines.get("flex_compile_seconds") else "")
                  + (f"; {baselines['flex_unavailable']}" if baselines.get("flex_unavailable")
                     else "")]
    if results.get("svi_step"):
        lines += ["", "SVI step (loss + backward + AdamW), median seconds (min-max); ratios of "
                  "medians; plain = a nanoGPT-style causal LM of the same size",
                  f"{'D':>5}{'L':>3}{'T':>6}{'B':>4}{'bayesian':>22}{'prior-free':>22}"
                  f"{'plain':>22}{'B/PF':>6}{'PF/plain':>9}{'mem PF/plain':>13}"]
        for r in results["svi_step"]:
            c = r["config"]

            def cell(kind, r=r):
                return (f"{r[f'{kind}_s']:.3f} ({r[f'{kind}_min_s']:.3f}-"
                        f"{r[f'{kind}_max_s']:.3f})")
            memory = r.get("prior_free_memory_over_plain")
            lines.append(f"{c['d_model']:>5}{c['n_layers']:>3}{r['seq_len']:>6}"
                         f"{r['batch_size']:>4}{cell('bayesian'):>22}{cell('prior_free'):>22}"
                         f"{cell('plain'):>22}{r['ratio']:>6.2f}"
                         f"{r['prior_free_over_plain']:>9.2f}"
                         + (f"{memory:>13.2f}" if memory is not None else f"{'-':>13}"))
        floors = [r for r in results["svi_step"] if r.get("full_only_over_plain") is not None]
        if floors:
            lines.append("where the prior-free step's cost goes, over plain: the full expert "
                         "alone (router, mixing, Pyro) + the other experts = all: "
                         + "; ".join(f"D {r['config']['d_model']} "
                                     f"{r['full_only_over_plain']:.2f} + "
                                     f"{r['prior_free_over_plain'] - r['full_only_over_plain']:.2f}"
                                     f" = {r['prior_free_over_plain']:.2f}" for r in floors))
        if any("memory_mb" in r for r in results["svi_step"]):
            lines.append("peak training memory above the imports (MiB, fresh process each): "
                         + "; ".join(", ".join(f"{k} {_mb(v['training_mb'])}"
                                               for k, v in r["memory_mb"].items())
                                     for r in results["svi_step"] if "memory_mb" in r))
    lines += ["", "Targets"]
    for t in results["targets"]:
        status = {True: "PASS", False: "FAIL", None: "n/a "}[t["passed"]]
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"[{status}] {t['description']}: {value} "
                     f"({t['comparison']} {t['threshold']:g})")
    return "\n".join(lines)


def bench_figure(results: dict) -> Figure:
    """Expert core times against T (forward, forward + backward) and the hard layer's mixes."""
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    plot_bench_experts(results, ax=axes[0], key="fwd_ms")
    plot_bench_experts(results, ax=axes[1], key="fwd_bwd_ms")
    plot_bench_hard_layer(results["hard_layer"], ax=axes[2])
    return fig


def bench_report(results: dict) -> str:
    """``report.md`` of a benchmark run: the table, the targets and the figure."""
    cfg = results["config"]
    return "\n".join([
        "# Benchmark", "",
        f"Sequence lengths {cfg['seq_lens']}, hard layer at T={cfg['hard_seq_len']}, "
        f"{cfg['repeats']} timed repeats after {cfg['warmup']} warm-up runs; raw times in "
        "`bench.json` (its `conventions` say how each number is measured).", "",
        "```", format_table(results), "```", "", "![benchmark](bench.png)", ""])
