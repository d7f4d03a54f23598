"""Speed benchmark of the attention experts and of the hard-routed layer on this machine.

:func:`run_benchmark` measures, in one run and under the same thread settings:

1. the machine's fp32 matmul throughput (the yardstick every other number is compared with);
2. each expert's attention core (``expert(q, k, v)`` on random ``(B, H, T, D/H)`` heads, causal),
   forward and forward + backward, at every sequence length, with the achieved GFLOP/s of the FLOP
   model and their fraction of the matmul throughput; the naive twins at short lengths;
3. the :class:`~bayes_router.models.router.RoutedAttention` layer at one long length with one-hot
   (hard) weights in several expert mixes, ``sparse=True``, against the full-only layer, beside the
   cost the FLOP model projects for each mix; and the soft (all experts dense) layer;
4. the speed targets, each recorded as passed or failed.

Results go to ``out_dir/bench.json``; :func:`format_table` renders them for the command line.
Times are medians of ``repeats`` runs after ``warmup`` runs, measured with
:func:`time.perf_counter`; forward times are taken under :func:`torch.no_grad`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bayes_router.analysis.study_plots import save_figure
from bayes_router.bench.baselines import (
    banded_sdpa,
    compiled_flex,
    peak_memory,
    plain_step,
    prior_free_step,
)
from bayes_router.bench.conventions import CONVENTIONS
from bayes_router.bench.report import bench_figure, bench_report
from bayes_router.bench.targets import (
    SCALING_SEQ_LENS,
    SHORT_SEQ_LENS,
    THROUGHPUT_TARGET_SEQ_LEN,
    check_targets,
)
from bayes_router.core.clock import interleaved_times, median_times
from bayes_router.inference.timing import svi_step_times
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.experts import build_expert, cost_vector, expert_flops
from bayes_router.models.router import RoutedAttention

logger = logging.getLogger(__name__)

SCHEMA = "bayes_router.bench/1"
EXPERTS = ("full", "linear", "local")
FWD_BWD_FLOP_FACTOR = 3.0
MATMUL_SIZE = 2048
#: LM sizes of the SVI step-time comparison: the Phase-1 TinyLM and a larger one.
SVI_CONFIGS = (
    {"vocab_size": 98, "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 128,
     "window": 16, "chunk_size": 32, "batch_size": 16},
    {"vocab_size": 98, "d_model": 128, "n_heads": 4, "n_layers": 4, "max_seq_len": 256,
     "window": 32, "chunk_size": 64, "batch_size": 16},
)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` calls."""
    return median_times({"": fn}, repeats, warmup)[""]


def matmul_throughput(size: int = MATMUL_SIZE, repeats: int = 5, warmup: int = 2,
                      generator: torch.Generator | None = None) -> dict:
    """fp32 ``size x size`` matmul throughput: ``{"size", "ms", "gflops"}``."""
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    seconds = median_time(lambda: a @ b, repeats, warmup)
    return {"size": size, "ms": 1e3 * seconds, "gflops": 2.0 * size**3 / seconds / 1e9}


def _forward(fn: Callable[..., Tensor], *args, **kwargs) -> Callable[[], Tensor]:
    """A closure running ``fn(*args, **kwargs)`` under :func:`torch.no_grad`."""
    def run():
        with torch.no_grad():
            return fn(*args, **kwargs)
    return run


def _forward_backward(fn: Callable[..., Tensor], args: Sequence, wrt: Sequence[Tensor],
                      cotangent: Tensor, **kwargs) -> Callable[[], object]:
    """A closure running ``fn(*args, **kwargs)`` and its backward pass into ``wrt``.

    :func:`torch.autograd.grad` returns the gradients instead of accumulating them in ``.grad``.
    """
    def run():
        return torch.autograd.grad(fn(*args, **kwargs), wrt, cotangent)
    return run


def one_hot_mix(batch: int, seq_len: int, shares: Sequence[float],
                generator: torch.Generator | None = None) -> tuple[Tensor, list[float]]:
    """One-hot weights ``(batch, seq_len, K)`` assigning tokens to experts in proportion ``shares``.

    Every sequence gets the same counts (largest-remainder rounding of ``share * seq_len``) at
    random positions. Returns the weights and the realised shares.
    """
    exact = [share * seq_len for share in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda k: counts[k] - exact[k])
    for k in by_remainder[:seq_len - sum(counts)]:
        counts[k] += 1
    labels = torch.repeat_interleave(torch.arange(len(shares)), torch.tensor(counts))  # (T,)
    index = torch.stack([labels[torch.randperm(seq_len, generator=generator)]
                         for _ in range(batch)])  # (B, T)
    weights = torch.nn.functional.one_hot(index, len(shares)).float()
    return weights, [count / seq_len for count in counts]


def _check_mixes(mixes: Sequence[Sequence[float]], n_experts: int) -> list[tuple[float, ...]]:
    checked = []
    for mix in mixes:
        mix = tuple(float(x) for x in mix)
        if len(mix) != n_experts or min(mix) < 0 or not math.isclose(sum(mix), 1.0, abs_tol=1e-6):
            raise ValueError(f"mixes: each mix must be {n_experts} non-negative shares of "
                             f"{EXPERTS} summing to 1, got {mix}")
        checked.append(mix)
    return checked


@dataclass(frozen=True)
class BenchConfig:
    """What :func:`run_benchmark` measures, checked when built.

    :param seq_lens: sequence lengths ``T`` at which every expert is timed.
    :param batch: batch size ``B``.
    :param d_model: model width ``D`` (heads have ``D / H`` dimensions).
    :param n_heads: number of heads ``H``.
    :param window: look-back of the ``local`` expert.
    :param repeats: timed runs per measurement (the median is reported).
    :param mixes: expert shares ``(full, linear, local)`` of the hard-routed layer (the
        defaults: full-only, the 25/50/25 mix of the projection target, all-linear, half full
        and half local, and a router that keeps nine tokens in ten on ``full``).
    :param hard_seq_len: sequence length of the layer benchmark (also its ``max_seq_len``);
        ``None``: the longest of ``seq_lens``.
    :param warmup: untimed runs before each measurement.
    :param naive_max_seq_len: the naive twins are timed (forward) at the lengths up to this one.
    :param chunk_size: chunk length of the ``linear`` expert.
    :param matmul_size: side of the square fp32 matmul that measures the machine's throughput.
    :param seed: seed of the random inputs and token assignments (a private generator; the
        global RNG is left alone).
    :param svi_configs: LM sizes (``TinyLMConfig`` fields plus ``batch_size``) at which one
        Bayesian SVI step is timed against one prior-free step and one step of the plain causal
        LM of that size (default :data:`SVI_CONFIGS`; ``()`` skips them).
    :param flex: also time compiled ``flex_attention`` as a local-attention baseline (it
        compiles once, tens of seconds).
    :param memory: measure each training configuration's peak memory in a fresh process.
    """

    seq_lens: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
    batch: int = 2
    d_model: int = 256
    n_heads: int = 4
    window: int = 64
    repeats: int = 5
    mixes: tuple[tuple[float, ...], ...] = ((1, 0, 0), (0.25, 0.5, 0.25), (0, 1, 0),
                                            (0.5, 0, 0.5), (0.9, 0.05, 0.05))
    hard_seq_len: int | None = None
    warmup: int = 2
    naive_max_seq_len: int = 512
    chunk_size: int = 64
    matmul_size: int = MATMUL_SIZE
    seed: int = 0
    svi_configs: tuple[dict, ...] | None = None
    flex: bool = True
    memory: bool = True

    def __post_init__(self):
        seq_lens = tuple(self.seq_lens)
        object.__setattr__(self, "seq_lens", seq_lens)
        if not seq_lens or any(not isinstance(t, int) or t < 2 for t in seq_lens):
            raise ValueError(f"seq_lens must be integers >= 2, got {seq_lens}")
        if self.hard_seq_len is None:
            object.__setattr__(self, "hard_seq_len", max(seq_lens))
        for name in ("batch", "d_model", "n_heads", "window", "repeats", "hard_seq_len",
                     "matmul_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hard_seq_len < 2:
            raise ValueError(f"hard_seq_len must be an integer >= 2, got {self.hard_seq_len!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads must divide d_model, got n_heads={self.n_heads}, "
                             f"d_model={self.d_model}")
        object.__setattr__(self, "mixes", tuple(_check_mixes(self.mixes, len(EXPERTS))))
        if self.svi_configs is not None:
            object.__setattr__(self, "svi_configs", tuple(self.svi_configs))


def _load_average() -> float | None:
    """The 1-minute load average (other processes competing for the cores skew every time)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _environment() -> dict:
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "load_average_1min": _load_average(),
        "cuda_available": torch.cuda.is_available(),
        "device": "cpu",
        "dtype": "float32",
    }


def run_benchmark(out_dir: str | os.PathLike, config: BenchConfig | None = None,
                  progress: bool = True) -> dict:
    """Benchmark the experts and the hard-routed layer; write ``out_dir/bench.json``.

    :param out_dir: output folder (created if missing).
    :param config: what to measure (default :class:`BenchConfig`'s defaults).
    :param progress: show a progress bar over the measurements.
    :returns: the results also written to ``bench.json`` (see :data:`CONVENTIONS`), with the
        table in ``report.md`` and the figure ``bench.png``.
    """
    c = BenchConfig() if config is None else config
    seq_lens, batch, d_model, n_heads, window = c.seq_lens, c.batch, c.d_model, c.n_heads, c.window
    repeats, warmup, mixes, hard_seq_len = c.repeats, c.warmup, c.mixes, c.hard_seq_len
    naive_max_seq_len, chunk_size, matmul_size, seed = (c.naive_max_seq_len, c.chunk_size,
                                                        c.matmul_size, c.seed)
    svi_configs, flex, memory = c.svi_configs, c.flex, c.memory
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    head_dim = d_model // n_heads
    # max_seq_len only bounds the lengths (every cost is taken at its own T); a window beyond
    # the sequence is legal here, where short lengths are timed with the long-sequence window
    cfg = TinyLMConfig(d_model=d_model, n_heads=n_heads, window=window, chunk_size=chunk_size,
                       max_seq_len=max(hard_seq_len, window + 1), experts=EXPERTS)
    naive_lens = [t for t in seq_lens if t <= naive_max_seq_len]
    n_routed = len({(1.0, 0.0, 0.0), *mixes})
    layer_runs = 2 * n_routed + 1 + len(EXPERTS)  # fwd and fwd+bwd, soft, dense cores
    total = (1 + 2 * len(EXPERTS) * len(seq_lens) + len(EXPERTS) * len(naive_lens) + layer_runs
             + 1 + int(flex)  # the local baselines
             + (len(SCALING_SEQ_LENS) if set(SCALING_SEQ_LENS) <= set(seq_lens) else 0)
             + sum(1 + len(mixes) for t in SHORT_SEQ_LENS if t in seq_lens))
    bar = tqdm(total=total, disable=not progress, desc="bench", unit="measurement")

    spreads: dict[str, list[float]] = {}

    def measure(label: str | Mapping[str, Callable[[], object]], fn=None):
        """Median milliseconds of ``fn``, or of each function of a mapping timed round-robin
        (every round's time kept for :func:`spread`)."""
        fns = {label: fn} if fn is not None else label
        bar.set_postfix_str(", ".join(fns)[:60])
        times = interleaved_times(fns, repeats, warmup)
        ms = {}
        for name, seconds in times.items():
            spreads[name] = [1e3 * t for t in seconds]
            ms[name] = statistics.median(spreads[name])
            logger.debug("%s: %.3f ms", name, ms[name])
        bar.update(len(fns))
        return ms[label] if fn is not None else ms

    def spread(label: str, prefix: str) -> dict:
        """``<prefix>_ms_min`` and ``<prefix>_ms_max`` of a measured label."""
        return {f"{prefix}_ms_min": min(spreads[label]), f"{prefix}_ms_max": max(spreads[label])}

    measure.spread = spread

    results: dict = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(),
        "config": {"seq_lens": list(seq_lens), "batch": batch, "d_model": d_model,
                   "n_heads": n_heads, "head_dim": head_dim, "window": window,
                   "chunk_size": chunk_size, "repeats": repeats, "warmup": warmup,
                   "mixes": [list(m) for m in mixes], "expert_order": list(EXPERTS),
                   "hard_seq_len": hard_seq_len, "naive_max_seq_len": naive_max_seq_len,
                   "matmul_size": matmul_size, "seed": seed, "causal": cfg.causal},
        "conventions": CONVENTIONS,
    }
    try:
        bar.set_postfix_str("matmul")
        results["matmul"] = matmul_throughput(matmul_size, repeats=max(repeats, 3), warmup=2,
                                              generator=generator)
        bar.update()
        peak = results["matmul"]["gflops"]
        logger.info("fp32 matmul %d: %.1f GFLOP/s", matmul_size, peak)
        baselines_at = (THROUGHPUT_TARGET_SEQ_LEN if THROUGHPUT_TARGET_SEQ_LEN in seq_lens
                        else max(seq_lens))
        results["experts"], results["naive"], results["local_baselines"] = _bench_experts(
            cfg, seq_lens, batch, naive_lens, peak, generator, measure, baselines_at, flex)
        if set(SCALING_SEQ_LENS) <= set(seq_lens):
            results["local_scaling"] = _bench_local_scaling(cfg, batch, generator, measure)
        results["hard_layer"] = _bench_layer(cfg, hard_seq_len, batch, mixes, generator, measure)
        short = [t for t in SHORT_SEQ_LENS if t <= cfg.max_seq_len and t in seq_lens]
        results["hard_layer_short"] = _bench_layer_short(cfg, short, batch, mixes, generator,
                                                         measure)
        results["svi_step"] = [_bench_svi_step(dict(c), repeats, warmup, seed, memory)
                               for c in (SVI_CONFIGS if svi_configs is None else svi_configs)]
    finally:
        bar.close()
    return finish_results(results, out_dir, "bench", check_targets, bench_figure, bench_report,
                          "report.md")


def finish_results(results: dict, out_dir: Path, stem: str, targets, figure, report,
                   report_name: str) -> dict:
    """Close a benchmark run: the load after it, its ``targets(results)`` with
    ``all_targets_passed``, ``<stem>.png`` from ``figure(results)``, ``<stem>.json`` written
    atomically, and ``report(results)`` into ``report_name``."""
    results["environment"]["load_average_1min_after"] = _load_average()
    results["targets"] = targets(results)
    decided = [t["passed"] for t in results["targets"] if t["passed"] is not None]
    results["all_targets_passed"] = bool(decided) and all(decided)
    results["figure"] = save_figure(figure(results), out_dir / f"{stem}.png")
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    (out_dir / report_name).write_text(report(results))
    logger.info("wrote %s", path)
    return results


def _bench_svi_step(spec: dict, repeats: int, warmup: int, seed: int,
                    memory: bool = True) -> dict:
    """One Bayesian SVI step (one-pass and naive two-pass) and one prior-free step against one
    step of the plain causal LM of the same size and the prior-free step with the full expert
    alone (the floor), timed round-robin; then each kind's peak memory in a fresh process."""
    spec = dict(spec)
    batch_size = spec.pop("batch_size", 16)
    cfg = TinyLMConfig(**spec)

    def extra_steps(c, x, y):
        return {"plain": plain_step(c, x, y),
                "prior_free_full_only": prior_free_step(c, x, y, ("full",))}

    timing = svi_step_times(cfg, batch_size=batch_size, repeats=repeats, warmup=warmup,
                            seed=seed, extra_steps=extra_steps)
    keys = [k for k in timing if k.endswith("_s")]
    row = {key: timing[key] for key in (*keys, "ratio", "two_pass_ratio", "batch_size",
                                        "seq_len", "estimator")}
    row["prior_free_over_plain"] = timing["prior_free_s"] / timing["plain_s"]
    row["bayesian_over_plain"] = timing["bayesian_s"] / timing["plain_s"]
    # the floor: the same router, mixing and Pyro with the full expert alone
    row["full_only_over_plain"] = timing["prior_free_full_only_s"] / timing["plain_s"]
    row["tokens_per_second"] = {kind: batch_size * timing["seq_len"] / timing[f"{kind}_s"]
                                for kind in ("bayesian", "prior_free", "plain")}
    if memory:
        row["memory_mb"] = {kind: peak_memory(kind, spec, batch_size)
                            for kind in ("bayesian", "prior-free", "plain")}
        mine, plain = (row["memory_mb"][k]["training_mb"] for k in ("prior-free", "plain"))
        row["prior_free_memory_over_plain"] = (mine / plain if mine is not None and plain
                                               else None)
    row["config"] = {k: timing["config"][k] for k in ("d_model", "n_heads", "n_layers",
                                                      "max_seq_len", "window", "chunk_size")}
    return row


def _bench_experts(cfg: TinyLMConfig, seq_lens, batch, naive_lens, peak, generator, measure,
                   baselines_at: int | None = None, flex: bool = True):
    """Forward and forward + backward of every expert's core at every length, the experts of
    one length timed round-robin; naive forwards; and at ``baselines_at`` the local-attention
    baselines (banded SDPA, compiled flex_attention) in the same round-robin as the experts."""
    H, d, D = cfg.n_heads, cfg.head_dim, cfg.d_model
    rows, naive_rows, local_baselines = [], [], {}
    for T in seq_lens:
        q, k, v, cotangent = (torch.randn(batch, H, T, d, generator=generator) for _ in range(4))
        q_, k_, v_ = (x.clone().requires_grad_() for x in (q, k, v))
        experts = {name: build_expert(name, cfg) for name in EXPERTS}
        forwards = {f"{name} T={T} fwd": _forward(e, q, k, v) for name, e in experts.items()}
        if T == baselines_at:
            forwards[f"sdpa-banded T={T} fwd"] = _forward(banded_sdpa(cfg.window, T), q, k, v)
            flex_fn, compile_s, why_not = compiled_flex(cfg.window, T) if flex else (
                None, None, "not asked (--no-flex)")
            local_baselines = {"seq_len": T, "flex_compile_seconds": compile_s,
                               "flex_unavailable": why_not}
            if flex_fn is not None:
                forwards[f"flex T={T} fwd"] = _forward(flex_fn, q, k, v)
        fwd = measure(forwards)
        fwd_bwd = measure({f"{name} T={T} fwd+bwd": _forward_backward(
            e, (q_, k_, v_), (q_, k_, v_), cotangent) for name, e in experts.items()})
        for name, expert in experts.items():
            fwd_ms, fwd_bwd_ms = fwd[f"{name} T={T} fwd"], fwd_bwd[f"{name} T={T} fwd+bwd"]
            fwd_flops = expert.flops_per_token(T, D, H) * batch * T
            executed = expert.executed_flops_per_token(T, D, H, batch=batch) * batch * T
            fwd_gflops = fwd_flops / fwd_ms / 1e6
            fwd_bwd_gflops = FWD_BWD_FLOP_FACTOR * fwd_flops / fwd_bwd_ms / 1e6
            rows.append({
                "expert": name, "seq_len": T, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
                **measure.spread(f"{name} T={T} fwd", "fwd"),
                **measure.spread(f"{name} T={T} fwd+bwd", "fwd_bwd"),
                "fwd_flops": fwd_flops, "fwd_bwd_flops": FWD_BWD_FLOP_FACTOR * fwd_flops,
                "fwd_executed_flops": executed,
                "fwd_gflops": fwd_gflops, "fwd_bwd_gflops": fwd_bwd_gflops,
                "fwd_fraction_of_matmul": fwd_gflops / peak,
                "fwd_executed_fraction_of_matmul": executed / fwd_ms / 1e6 / peak,
                "fwd_bwd_fraction_of_matmul": fwd_bwd_gflops / peak,
            })
            if T in naive_lens:
                naive_ms = measure(f"naive {name} T={T} fwd", _forward(expert.naive, q, k, v))
                naive_rows.append({"expert": name, "seq_len": T, "fwd_ms": naive_ms,
                                   "speedup_of_fast": naive_ms / fwd_ms})
        if T == baselines_at:
            local_ms = fwd[f"local T={T} fwd"]
            for label, key in (("sdpa-banded", "sdpa_banded"), ("flex", "flex")):
                ms = fwd.get(f"{label} T={T} fwd")
                local_baselines[f"{key}_fwd_ms"] = ms
                local_baselines[f"{key}_over_local"] = None if ms is None else ms / local_ms
            local_baselines["local_fwd_ms"] = local_ms
    return rows, naive_rows, local_baselines


def _bench_local_scaling(cfg: TinyLMConfig, batch: int, generator, measure) -> dict:
    """The local expert's forward at the two lengths of the scaling target in *one*
    round-robin (the expert rows time each length in its own, so their ratio also holds the
    machine's drift between two measurements)."""
    local = build_expert("local", cfg)
    labels = {T: f"local scaling T={T} fwd" for T in SCALING_SEQ_LENS}
    ms = measure({labels[T]: _forward(local, *(torch.randn(batch, cfg.n_heads, T, cfg.head_dim,
                                                           generator=generator)
                                               for _ in range(3)))
                  for T in SCALING_SEQ_LENS})
    short, long = (ms[labels[T]] for T in SCALING_SEQ_LENS)
    return {"seq_lens": list(SCALING_SEQ_LENS), "fwd_ms": [short, long], "ratio": long / short,
            **{f"T{T}": measure.spread(labels[T], "fwd") for T in SCALING_SEQ_LENS}}


def _bench_layer_short(cfg: TinyLMConfig, lengths, batch: int, mixes, generator,
                       measure) -> list[dict]:
    """The hard-routed layer's forward in every mix against full-only at short lengths, where
    the sparse paths' bookkeeping weighs most (each length timed round-robin)."""
    layer = _seeded_layer(cfg, generator)
    rows = []
    full_only = (1.0, 0.0, 0.0)
    for T in lengths:
        x = torch.randn(batch, T, cfg.d_model, generator=generator)

        def label(mix, T=T) -> str:
            return f"short T={T} " + "/".join(f"{v:g}" for v in mix)

        fwd = measure({label(mix): _forward(layer, x, one_hot_mix(batch, T, mix, generator)[0],
                                            sparse=True)
                       for mix in dict.fromkeys((full_only, *mixes))})
        reference = fwd[label(full_only)]
        for mix in mixes:
            rows.append({"seq_len": T, "mix": list(mix), "fwd_ms": fwd[label(mix)],
                         "full_only_fwd_ms": reference, "fwd_ratio": fwd[label(mix)] / reference})
    return rows


def _seeded_layer(cfg: TinyLMConfig, generator: torch.Generator) -> RoutedAttention:
    """A ``RoutedAttention`` seeded from ``generator`` (the caller's global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        return RoutedAttention(cfg)


def _bench_layer(cfg: TinyLMConfig, T: int, batch: int, mixes, generator, measure) -> dict:
    """The hard-routed layer in each mix against the full-only layer; the soft layer; the dense
    expert cores on the layer's heads. Each group is timed round-robin so its ratios are fair."""
    layer = _seeded_layer(cfg, generator)
    params = list(layer.parameters())
    x = torch.randn(batch, T, cfg.d_model, generator=generator)
    x_ = x.clone().requires_grad_()
    cotangent = torch.randn(batch, T, cfg.d_model, generator=generator)
    core = cost_vector(cfg, T).tolist()
    with_proj = expert_flops(cfg, T, include_projections=True)
    with_proj = [with_proj[name] / with_proj["full"] for name in EXPERTS]
    with torch.no_grad():
        q, k, v = layer._heads(layer.qkv(x))  # the heads exactly as the layer hands them over

    full_only = (1.0, 0.0, 0.0)
    routed = {full_only: one_hot_mix(batch, T, full_only, generator)}
    for mix in mixes:
        if mix not in routed:
            routed[mix] = one_hot_mix(batch, T, mix, generator)
    labels = {mix: "full-only" if mix == full_only else "/".join(f"{s:g}" for s in mix)
              for mix in routed}
    soft = torch.full((batch, T, len(EXPERTS)), 1.0 / len(EXPERTS))
    fwd = measure({
        **{f"layer {labels[m]} fwd": _forward(layer, x, w, sparse=True)
           for m, (w, _) in routed.items()},
        "layer soft fwd": _forward(layer, x, soft, sparse=False),
        **{f"layer core {e.name} fwd": _forward(e, q, k, v) for e in layer.experts},
    })
    fwd_bwd = measure({
        f"layer {labels[m]} fwd+bwd": _forward_backward(layer, (x_, w), (x_, *params), cotangent,
                                                        sparse=True)
        for m, (w, _) in routed.items()})
    ref_fwd, ref_fwd_bwd = fwd["layer full-only fwd"], fwd_bwd["layer full-only fwd+bwd"]
    dense_core = {e.name: fwd[f"layer core {e.name} fwd"] for e in layer.experts}
    outside_core = max(ref_fwd - dense_core["full"], 0.0)  # projections, mixing, bookkeeping
    timed = [(outside_core + dense_core[name]) / ref_fwd for name in EXPERTS]
    rows = []
    for mix in mixes:
        realised = routed[mix][1]
        mix_fwd = fwd[f"layer {labels[mix]} fwd"]
        mix_fwd_bwd = fwd_bwd[f"layer {labels[mix]} fwd+bwd"]
        rows.append({
            "mix": list(mix), "realised_shares": realised,
            "fwd_ms": mix_fwd, "fwd_bwd_ms": mix_fwd_bwd,
            "fwd_ratio": mix_fwd / ref_fwd, "fwd_bwd_ratio": mix_fwd_bwd / ref_fwd_bwd,
            "projected_cost_attention_core": sum(s * c for s, c in zip(realised, core)),
            "projected_cost_with_projections": sum(s * c for s, c in zip(realised, with_proj)),
            "projected_cost_timed": sum(s * c for s, c in zip(realised, timed)),
        })
    return {
        "seq_len": T, "batch": batch, "cfg": cfg.to_dict(), "sparse": True,
        "cost_attention_core": dict(zip(EXPERTS, core)),
        "cost_with_projections": dict(zip(EXPERTS, with_proj)),
        "cost_timed": dict(zip(EXPERTS, timed)),
        "dense_core_fwd_ms": dense_core,
        "full_only_fwd_ms": ref_fwd, "full_only_fwd_bwd_ms": ref_fwd_bwd,
        "soft_fwd_ms": fwd["layer soft fwd"], "soft_fwd_ratio": fwd["layer soft fwd"] / ref_fwd,
        "mixes": rows,
    }


