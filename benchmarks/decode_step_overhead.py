"""The fixed cost of a routed decoding step at B = 1: the plain LM's step with a KV cache
against the routed LM with every token on ``full`` (no controller at all) and with a Bayesian
router's controller and uncertainty computed at every step, interleaved.

    python benchmarks/decode_step_overhead.py [--context 1024] [--rounds 9]
"""

import argparse
import os
import statistics

import torch

from bayes_router.bench.baselines import PlainCausalLM
from bayes_router.bench.decode import (
    DECODE_MODEL,
    MixRouter,
    PlainKVDecoder,
    filled_cache,
    rewind,
)
from bayes_router.core.clock import interleaved_times
from bayes_router.inference.timing import full_only_router
from bayes_router.models import BayesianRoutedLM, TinyLMConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(2)
    t, steps = args.context, args.steps
    cfg = TinyLMConfig(**DECODE_MODEL, max_seq_len=t + steps)
    torch.manual_seed(0)
    routed = BayesianRoutedLM(cfg).eval()
    plain = PlainCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    cache = filled_cache(routed.lm, args.batch, t, t + steps, g)
    decoder = PlainKVDecoder(plain, cfg, args.batch, t + steps, g)
    token = torch.zeros(args.batch, 1, dtype=torch.long)

    def routed_step(router):
        def run():
            if hasattr(router, "reset"):
                router.reset()
            for _ in range(steps):
                routed.lm(token, router, mode="hard", cache=cache)
            rewind(cache, t)
        return run

    def plain_step():
        decoder.length = t
        for _ in range(steps):
            decoder.step(token)

    fns = {"plain LM, KV cache": plain_step,
           "routed, every token on full, no controller": routed_step(full_only_router(routed)),
           "routed, every token on full, Bayesian controller and uncertainty":
               routed_step(MixRouter((1.0, 0.0, 0.0), 0, routed.decision))}
    with torch.no_grad():
        times = interleaved_times(fns, args.rounds, 2)
    print(f"B={args.batch}, context {t}, {steps} steps per call, {args.rounds} rounds, "
          f"load {os.getloadavg()[0]:.2f}; ms per step: median [min, max]")
    for label, seconds in times.items():
        ms = [1e3 * s / steps for s in seconds]
        print(f"  {label}: {statistics.median(ms):.3f} [{min(ms):.3f}, {max(ms):.3f}]")


if __name__ == "__main__":
    main()
