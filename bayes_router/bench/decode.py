"""The decoding benchmark: one token per sequence per step, from caches of a long context.

:func:`run_decode_benchmark` times, per batch size, in one round-robin over every context:

- the routed TinyLM's decoding step under hard routing at each expert mix (full-only, each
  expert alone, the mixes of the prefill benchmark), each token's expert drawn from the mix
  (every sequence of a step independently, so a batch's sequences read different experts),
  with a Bayesian router's controller and uncertainty computed at every step as a trained
  router's are;
- gated routing that sends every token hard, beside hard routing at the 25/50/25 mix (what the
  uncertainty and the grouping cost);
- the peer: a plain nanoGPT-style LM of the same size decoding with a standard KV cache;
- the machine's copy bandwidth (the limit of reading a cache), in the same round-robin.

Each timed call runs ``steps`` decoding steps from a context of ``t`` cached tokens, then
rewinds the caches to ``t`` (the states keep their size; only the lengths move back), so every
call decodes at the same context. It also times the prefill of a prompt against the
whole-sequence forward pass. Results: ``decode.json`` (see :data:`DECODE_CONVENTIONS`), the
targets, ``decode.png`` and ``decode.md``.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from bayes_router.bench.baselines import PlainCausalLM
from bayes_router.bench.harness import _environment, finish_results
from bayes_router.core.clock import interleaved_times
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.experts import build_expert
from bayes_router.models.router import RoutingDecision
from bayes_router.models.tinylm import DecodeCache, TinyLM

logger = logging.getLogger(__name__)

SCHEMA = "bayes_router.bench.decode/1"
EXPERTS = ("full", "linear", "local")
#: Expert shares (full, linear, local) timed at every context: full-only, each expert alone,
#: then the prefill benchmark's other default mixes.
DECODE_MIXES = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.25, 0.5, 0.25),
                (0.5, 0.0, 0.5), (0.9, 0.05, 0.05))
GATED_MIX = (0.25, 0.5, 0.25)
#: The model: the prefill benchmark's width, heads and window, two layers.
DECODE_MODEL = {"vocab_size": 98, "d_model": 256, "n_heads": 4, "n_layers": 2, "window": 64,
                "chunk_size": 64}
COPY_BYTES = 1 << 28  # 256 MiB, larger than any cache level

# the targets
CONSTANT_STATE_TARGET = 1.2  # D1: local / linear step at the longest context / the shortest
PROJECTION_CONTEXT = 8192
PROJECTION_TARGET = 1.3  # D2: measured / (projection x full-only), every mix
PEER_TARGET = 1.25  # D3: full-only step / plain LM step with a KV cache
BANDWIDTH_TARGET = 0.40  # D3: full's cache reads / copy bandwidth
GATED_TARGET = 1.1  # D4: gated, every token hard / hard
PREFILL_LEN = 4096
PREFILL_TARGET = 1.1  # D5: prefill / whole-sequence forward

DECODE_CONVENTIONS = {
    "step_ms": "wall-clock milliseconds of one decoding step (one token for each of the "
               "batch's sequences), the mean of `steps` steps in one timed call; min, median "
               "and max over the repeats",
    "tokens_per_s": "batch / median step seconds",
    "context": "tokens cached per sequence before the step (the step's query sees context + 1)",
    "mix": "hard routing, every token's expert drawn independently from these shares (full, "
           "linear, local) in every layer",
    "cache_bytes_per_sequence": "bytes of every expert state of every layer, per sequence: the "
                                "routed model keeps all of them whatever the mix",
    "projection": "whole-step FLOP projection relative to full-only at the same context: "
                  "(fixed + sum_k share_k read_k(t)) / (fixed + read_full(t)); fixed = every "
                  "layer's q/k/v/out projections 8 D^2, MLP 4 r D^2, router MLP and every "
                  "expert's state write, plus the head 2 D V; read_k = the expert's "
                  "decode_flops read (full 4 D (t + 1), local 4 D (min(t, w) + 1), linear "
                  "2 D (d + 1))",
    "copy_gb_s": "bytes read plus bytes written per second by a copy of config.copy_bytes",
    "cache_read_fraction": "full's KV cache bytes (all layers) / (full-only step - linear-only "
                           "step), over copy_gb_s: the rate at which the full-only step reads "
                           "its cache, the step's other work taken out as the linear-only "
                           "step's",
    "prefill": "the prompt's forward pass writing every expert's state, over the same pass "
               "without a cache, hard routing",
}


class MixRouter:
    """Hard routing by draws: every token's expert in every layer drawn from ``shares``.

    :param decide: a router's ``decision(layer, features)`` to run first (its controller and
        uncertainty cost time like a trained router's); its weights are then replaced by the
        draw, and its uncertainty by zeros (a gate sends every token hard).
    """

    def __init__(self, shares: Sequence[float], seed: int = 0,
                 decide: Callable[[int, Tensor], RoutingDecision] | None = None):
        self.shares = torch.tensor(shares, dtype=torch.float64)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.decide = decide

    def reset(self) -> None:
        """Start the draws over: every timed call of every variant with this seed routes the
        same tokens to the same experts (a comparison of two variants is then not one of two
        draws)."""
        self.generator.manual_seed(self.seed)

    def __call__(self, layer: int, features: Tensor) -> RoutingDecision:
        *lead, _ = features.shape
        if self.decide is not None:
            self.decide(layer, features)
        draw = torch.multinomial(self.shares, int(torch.Size(lead).numel()), replacement=True,
                                 generator=self.generator).view(*lead)
        weights = F.one_hot(draw, len(self.shares)).to(features.dtype)
        return RoutingDecision(weights=weights, mean=weights,
                               uncertainty=torch.zeros(lead, dtype=features.dtype))


class PlainKVDecoder:
    """Decoding with a standard KV cache in :class:`~bayes_router.bench.baselines.
    PlainCausalLM` (the peer): one preallocated ``(B, H, capacity, d)`` key and value buffer per
    layer, each step writes its token and attends every cached key."""

    def __init__(self, model: PlainCausalLM, cfg: TinyLMConfig, batch: int, capacity: int,
                 generator: torch.Generator):
        H, d = cfg.n_heads, cfg.head_dim
        self.model, self.cfg = model, cfg
        self.keys = [torch.randn(batch, H, capacity, d, generator=generator)
                     for _ in model.blocks]
        self.values = [torch.randn(batch, H, capacity, d, generator=generator)
                       for _ in model.blocks]
        self.length = 0

    def step(self, token: Tensor) -> Tensor:
        B, n = token.shape[0], self.length
        h = self.model.token_embedding(token) + self.model.position_embedding.weight[n]
        for block, keys, values in zip(self.model.blocks, self.keys, self.values, strict=True):
            q, k, v = block.qkv(block.ln1(h)).view(B, 1, 3, block.n_heads, -1).permute(
                2, 0, 3, 1, 4)  # 3 x (B, H, 1, d)
            keys[:, :, n] = k[:, :, 0]
            values[:, :, n] = v[:, :, 0]
            a = F.scaled_dot_product_attention(q, keys[:, :, :n + 1], values[:, :, :n + 1])
            h = h + block.out(a.transpose(1, 2).reshape(B, 1, -1))
            h = h + block.mlp(block.ln2(h))
        self.length = n + 1
        return self.model.head(self.model.ln_final(h))


def filled_cache(model: TinyLM, batch: int, context: int, capacity: int,
                 generator: torch.Generator) -> DecodeCache:
    """A cache of ``context`` random keys and values per sequence in every expert's state (as
    a prefill leaves it; the numbers do not change the time of a step)."""
    cache = model.new_cache(batch, capacity)
    H, d = model.cfg.n_heads, model.cfg.head_dim
    for layer, block in zip(cache.layers, model.blocks, strict=True):
        k = torch.randn(batch, H, context, d, generator=generator)
        v = torch.randn(batch, H, context, d, generator=generator)
        layer.states = [expert.write_state(None, k, v, capacity=capacity)
                        for expert in block.attn.experts]
    cache.set_lengths(torch.full((batch,), context, dtype=torch.long))
    cache.filled = True
    return cache


def rewind(cache: DecodeCache, context: int) -> None:
    """Move every sequence back to ``context`` tokens (the states keep their contents past it:
    the next steps overwrite them, at the same cost)."""
    cache.set_lengths(torch.full_like(cache.lengths, context))


def whole_step_projection(cfg: TinyLMConfig, shares: Sequence[float], context: int) -> float:
    """The decoding step of ``shares`` relative to full-only at ``context``, in useful FLOPs
    (see :data:`DECODE_CONVENTIONS`)."""
    D, H = cfg.d_model, cfg.n_heads
    experts = [build_expert(name, cfg) for name in cfg.experts]
    flops = [e.decode_flops(context, D, H) for e in experts]
    router = 2 * (D + 2) * cfg.controller_hidden + 2 * cfg.controller_hidden * cfg.n_experts
    layer_fixed = (8 + 4 * cfg.mlp_ratio) * D * D + router + sum(f["write"] for f in flops)
    fixed = cfg.n_layers * layer_fixed + 2 * D * cfg.vocab_size
    full = flops[list(cfg.experts).index("full")]["read"]
    mixed = sum(s * f["read"] for s, f in zip(shares, flops, strict=True))
    return (fixed + cfg.n_layers * mixed) / (fixed + cfg.n_layers * full)


def _label(shares: Sequence[float]) -> str:
    return "/".join(f"{100 * s:g}" for s in shares)


def _stats(seconds: list[float], steps: int) -> dict:
    ms = [1e3 * s / steps for s in seconds]
    return {"step_ms_min": min(ms), "step_ms": statistics.median(ms), "step_ms_max": max(ms)}


def _validate(contexts, batches, repeats, steps, warmup) -> None:
    for name, values in (("contexts", contexts), ("batches", batches)):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                             for v in values):
            raise ValueError(f"{name} must be a non-empty list of integers >= 1, got "
                             f"{list(values)}")
    for name, value, least in (("repeats", repeats, 1), ("steps", steps, 1),
                               ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def run_decode_benchmark(out_dir: str | os.PathLike,
                         contexts: Sequence[int] = (1024, 4096, 8192, 16384),
                         batches: Sequence[int] = (1, 8), repeats: int = 5, steps: int = 16,
                         warmup: int = 1, mixes: Sequence[Sequence[float]] = DECODE_MIXES,
                         prefill_len: int | None = PREFILL_LEN, model: dict | None = None,
                         seed: int = 0, progress: bool = True,
                         copy_bytes: int = COPY_BYTES) -> dict:
    """Time decoding steps (see the module docstring); write ``decode.json``, ``decode.png``
    and ``decode.md`` into ``out_dir``.

    :param contexts: cached tokens per sequence at which a step is timed.
    :param batches: sequences decoded together (one round-robin per batch size).
    :param repeats: timed calls per variant; ``steps`` decoding steps each.
    :param mixes: hard-routing shares (full, linear, local).
    :param prefill_len: prompt length of the prefill timing (``None``: skipped).
    :param model: :class:`TinyLMConfig` fields (default :data:`DECODE_MODEL`).
    :param copy_bytes: size of the copy that measures the bandwidth.
    """
    contexts, batches = tuple(contexts), tuple(batches)
    _validate(contexts, batches, repeats, steps, warmup)
    if prefill_len is not None and prefill_len < 1:
        raise ValueError(f"prefill_len must be >= 1 or None, got {prefill_len!r}")
    mixes = [tuple(float(s) for s in m) for m in mixes]
    if any(len(m) != len(EXPERTS) or min(m) < 0 or abs(sum(m) - 1) > 1e-6 for m in mixes):
        raise ValueError(f"mixes must give {len(EXPERTS)} shares >= 0 summing to 1 each "
                         f"(full, linear, local), got {mixes}")
    if (1.0, 0.0, 0.0) not in mixes:
        mixes = [(1.0, 0.0, 0.0), *mixes]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    capacity_extra = steps
    max_len = max(max(contexts) + capacity_extra, prefill_len or 0, DECODE_MODEL["window"] + 1)
    cfg = TinyLMConfig(**{**DECODE_MODEL, **(model or {})}, max_seq_len=max_len,
                       experts=EXPERTS)
    torch.manual_seed(seed)  # the weights (the time does not depend on them)
    routed = BayesianRoutedLM(cfg).eval()  # its router runs at every step
    lm = routed.lm
    plain = PlainCausalLM(cfg).eval()
    results: dict = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(),
        "config": {"model": {k: getattr(cfg, k) for k in DECODE_MODEL} | {
                       "max_seq_len": cfg.max_seq_len, "experts": list(EXPERTS)},
                   "contexts": list(contexts), "batches": list(batches), "repeats": repeats,
                   "steps": steps, "warmup": warmup, "mixes": [list(m) for m in mixes],
                   "gated_mix": list(GATED_MIX), "prefill_len": prefill_len, "seed": seed,
                   "copy_bytes": copy_bytes},
        "conventions": DECODE_CONVENTIONS,
        "steps": [],
    }
    per_batch = len(contexts) * (len(mixes) + 2) + 1
    total = len(batches) * per_batch + (2 if prefill_len else 0)
    bar = tqdm(total=total, disable=not progress, desc="decode bench", unit="variant")
    try:
        with torch.no_grad():
            for batch in batches:
                bar.set_postfix_str(f"B={batch}")
                results["steps"] += _bench_batch(routed, plain, cfg, batch, contexts, mixes, steps,
                                                 repeats, warmup, generator, results,
                                                 copy_bytes, seed)
                bar.update(per_batch)
            if prefill_len:
                bar.set_postfix_str(f"prefill T={prefill_len}")
                results["prefill"] = _bench_prefill(lm, prefill_len, repeats, warmup, generator)
                bar.update(2)
    finally:
        bar.close()
    return finish_results(results, out_dir, "decode", decode_targets, decode_figure,
                          decode_report, "decode.md")


def _bench_batch(routed: BayesianRoutedLM, plain: PlainCausalLM, cfg: TinyLMConfig,
                 batch: int, contexts, mixes, steps: int, repeats: int, warmup: int,
                 generator: torch.Generator, results: dict, copy_bytes: int, seed: int
                 ) -> list[dict]:
    """Every variant at every context for one batch size, in one round-robin."""
    lm = routed.lm
    fns: dict[str, Callable[[], object]] = {}
    meta: dict[str, dict] = {}
    tokens = torch.randint(0, cfg.vocab_size, (batch, 1), generator=generator)
    for t in contexts:
        cache = filled_cache(lm, batch, t, t + steps, generator)
        cache_bytes = cache.nbytes
        full_bytes = sum(layer.states[0].keys[:, :, :t].nbytes + layer.states[0].values[
            :, :, :t].nbytes for layer in cache.layers)

        def step(router, mode, threshold=None, cache=cache, t=t):
            def run():
                router.reset()
                for _ in range(steps):
                    lm(tokens, router, mode=mode, gate_threshold=threshold, cache=cache)
                rewind(cache, t)
            return run

        variants = {f"hard {_label(m)}": (step(MixRouter(m, seed, routed.decision), "hard"), m)
                    for m in mixes}
        variants[f"gated-all-hard {_label(GATED_MIX)}"] = (
            step(MixRouter(GATED_MIX, seed, routed.decision), "gated", 0.5), GATED_MIX)
        decoder = PlainKVDecoder(plain, cfg, batch, t + steps, generator)

        def peer(decoder=decoder, t=t):
            decoder.length = t
            for _ in range(steps):
                decoder.step(tokens)

        variants["plain KV cache"] = (peer, None)
        for name, (fn, shares) in variants.items():
            label = f"B{batch} t{t} {name}"
            fns[label] = fn
            meta[label] = {"batch": batch, "context": t, "variant": name,
                           "shares": None if shares is None else list(shares),
                           "cache_bytes_per_sequence": cache_bytes // batch,
                           "full_cache_bytes": full_bytes,
                           "projection": None if shares is None else
                           whole_step_projection(cfg, shares, t)}
    src = torch.rand(copy_bytes // 4, generator=generator)
    dst = torch.empty_like(src)
    fns[f"B{batch} copy"] = lambda: dst.copy_(src)
    times = interleaved_times(fns, repeats, warmup)
    copy = times.pop(f"B{batch} copy")
    copy_gb_s = 2 * copy_bytes / statistics.median(copy) / 1e9
    results.setdefault("copy_gb_s", {})[str(batch)] = {
        "median": copy_gb_s, "max": 2 * copy_bytes / min(copy) / 1e9,
        "min": 2 * copy_bytes / max(copy) / 1e9}
    rows = []
    for label, seconds in times.items():
        row = meta[label] | _stats(seconds, steps)
        row["tokens_per_s"] = row["batch"] / (row["step_ms"] / 1e3)
        rows.append(row)
    for t in contexts:  # ratios within one context
        at = {r["variant"]: r for r in rows if r["context"] == t}
        full = at[f"hard {_label((1.0, 0.0, 0.0))}"]
        linear = at.get(f"hard {_label((0.0, 1.0, 0.0))}")
        for r in at.values():
            r["over_full_only"] = r["step_ms"] / full["step_ms"]
            if r["projection"] is not None:
                r["over_projection"] = r["over_full_only"] / r["projection"]
        full["over_plain"] = full["step_ms"] / at["plain KV cache"]["step_ms"]
        if linear is not None and full["step_ms"] > linear["step_ms"]:
            seconds = (full["step_ms"] - linear["step_ms"]) / 1e3
            full["cache_read_gb_s"] = full["full_cache_bytes"] / seconds / 1e9
            full["cache_read_fraction"] = full["cache_read_gb_s"] / copy_gb_s
    return rows


def _bench_prefill(lm: TinyLM, T: int, repeats: int, warmup: int,
                   generator: torch.Generator) -> dict:
    """A ``T``-token prompt through the forward pass with an empty cache (the prefill) against
    the same pass without one, hard routing at the 25/50/25 mix, one sequence."""
    x = torch.randint(0, lm.cfg.vocab_size, (1, T), generator=generator)
    router = MixRouter(GATED_MIX, 1)

    def forward(cache=None):
        router.reset()  # both passes route every token alike
        return lm(x, router, mode="hard", cache=cache)

    fns = {"forward": forward, "prefill": lambda: forward(lm.new_cache(1, T))}
    times = interleaved_times(fns, repeats, warmup)
    out = {"seq_len": T, "mix": list(GATED_MIX)}
    for name, seconds in times.items():
        ms = [1e3 * s for s in seconds]
        out[name] = {"ms_min": min(ms), "ms": statistics.median(ms), "ms_max": max(ms)}
    out["ratio"] = out["prefill"]["ms"] / out["forward"]["ms"]
    return out


def _target(name: str, description: str, value: float | None, threshold: float,
            comparison: str = "<=") -> dict:
    passed = None if value is None else bool(
        value <= threshold if comparison == "<=" else value >= threshold)
    return {"name": name, "description": description, "value": value, "threshold": threshold,
            "comparison": comparison, "passed": passed}


def decode_targets(results: dict) -> list[dict]:
    """D1-D5 (``docs/experts.md``), each ``passed=None`` where the run lacks what it needs."""
    rows = results["steps"]
    contexts = results["config"]["contexts"]
    targets = []

    def step(batch, t, variant):
        return next((r for r in rows if (r["batch"], r["context"], r["variant"])
                     == (batch, t, variant)), None)

    first, last = min(contexts), max(contexts)
    for batch in results["config"]["batches"]:
        for expert, shares in (("local", (0.0, 0.0, 1.0)), ("linear", (0.0, 1.0, 0.0))):
            short, long = (step(batch, t, f"hard {_label(shares)}") for t in (first, last))
            targets.append(_target(
                f"D1_{expert}_constant_B{batch}",
                f"{expert}-only step at context {last} / at {first}, B={batch}",
                None if short is None or long is None or last == first
                else long["step_ms"] / short["step_ms"], CONSTANT_STATE_TARGET))
        at = [r for r in rows if r["batch"] == batch and r["context"] == PROJECTION_CONTEXT
              and r["variant"].startswith("hard ")]
        worst = max(at, key=lambda r: r["over_projection"], default=None)
        targets.append(_target(
            f"D2_projection_B{batch}",
            f"hard step / (projection x full-only) at context {PROJECTION_CONTEXT}, worst mix"
            + ("" if worst is None else f" ({worst['variant'][5:]})") + f", B={batch}",
            None if worst is None else worst["over_projection"], PROJECTION_TARGET))
        full = step(batch, PROJECTION_CONTEXT, f"hard {_label((1.0, 0.0, 0.0))}")
        targets.append(_target(
            f"D3_peer_B{batch}", f"full-only step / plain LM step with a KV cache at context "
            f"{PROJECTION_CONTEXT}, B={batch}", None if full is None else full["over_plain"],
            PEER_TARGET))
        targets.append(_target(
            f"D3_bandwidth_B{batch}", f"full-only cache reads / copy bandwidth at context "
            f"{PROJECTION_CONTEXT}, B={batch}",
            None if full is None else full.get("cache_read_fraction"), BANDWIDTH_TARGET, ">="))
        gated = step(batch, PROJECTION_CONTEXT, f"gated-all-hard {_label(GATED_MIX)}")
        hard = step(batch, PROJECTION_CONTEXT, f"hard {_label(GATED_MIX)}")
        targets.append(_target(
            f"D4_gated_B{batch}", f"gated (every token hard) / hard at {_label(GATED_MIX)}, "
            f"context {PROJECTION_CONTEXT}, B={batch}",
            None if gated is None or hard is None else gated["step_ms"] / hard["step_ms"],
            GATED_TARGET))
    prefill = results.get("prefill")
    targets.append(_target(
        "D5_prefill", f"prefill / whole-sequence forward, T={PREFILL_LEN}",
        None if prefill is None or prefill["seq_len"] != PREFILL_LEN else prefill["ratio"],
        PREFILL_TARGET))
    return targets


def decode_figure(results: dict) -> Figure:
    """Per batch size: step time against context for every variant (log-log)."""
    batches = results["config"]["batches"]
    fig = Figure(figsize=(5.2 * len(batches), 4.0))
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    for ax, batch in zip(axes, batches, strict=True):
        rows = [r for r in results["steps"] if r["batch"] == batch]
        for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
            mine = sorted((r for r in rows if r["variant"] == variant),
                          key=lambda r: r["context"])
            ax.plot([r["context"] for r in mine], [r["step_ms"] for r in mine], marker="o",
                    ms=3, label=variant, color=f"C{i}",
                    ls="--" if not variant.startswith("hard") else "-")
        ax.set(xscale="log", yscale="log", xlabel="context (cached tokens)",
               ylabel="decoding step (ms)", title=f"B = {batch}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def decode_table(results: dict) -> str:
    """The step times and ratios as a text table, then the targets."""
    lines = [f"{'B':>2} {'context':>7} {'variant':<26} {'step ms':>8} {'tok/s':>8} "
             f"{'/full':>6} {'/proj':>6}"]
    for r in results["steps"]:
        proj = r.get("over_projection")
        lines.append(f"{r['batch']:>2} {r['context']:>7} {r['variant']:<26} "
                     f"{r['step_ms']:>8.3f} {r['tokens_per_s']:>8.1f} "
                     f"{r['over_full_only']:>6.2f} "
                     f"{'' if proj is None else f'{proj:.2f}':>6}")
    lines.append("")
    for t in results["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[t["passed"]]
        lines.append(f"{verdict:<12} {t['description']}: {value} "
                     f"({t['comparison']} {t['threshold']})")
    return "\n".join(lines)


def decode_report(results: dict) -> str:
    """``decode.md``: the conditions, the table and the figure."""
    env = results["environment"]
    copy = ", ".join(f"B={b}: {v['median']:.1f} GB/s" for b, v in results["copy_gb_s"].items())
    lines = ["# Decoding benchmark", "",
             f"torch {env.get('torch')}, {env.get('num_threads')} threads, load "
             f"{env.get('load_average_1min')} -> {env.get('load_average_1min_after')}; "
             f"copy bandwidth {copy}. Model {results['config']['model']}; "
             f"{results['config']['steps']} steps per timed call, "
             f"{results['config']['repeats']} calls per variant, interleaved.", ""]
    prefill = results.get("prefill")
    if prefill:
        lines += [f"Prefill of {prefill['seq_len']} tokens: {prefill['prefill']['ms']:.1f} ms "
                  f"against {prefill['forward']['ms']:.1f} ms without a cache "
                  f"({prefill['ratio']:.3f}x).", ""]
    lines += ["```", decode_table(results), "```", "", "![decoding](decode.png)", ""]
    return "\n".join(lines)
