"""What a mixed batch costs a decoding step: at the Phase-1 width (D = 64, w = 16), B = 8,
the step with every token on ``full``, on ``local``, and hard mixes whose sequences read
different experts (drawn per token and layer, the same draws for every call), interleaved;
then the operator profile of 50/0/50 beside full-only, to show where the time of the grouping
goes (per-sequence reads of ``full``'s cache, gathers, scatters, slices).

    python benchmarks/decode_mix_overhead.py [--context 2048] [--rounds 9]
"""

import argparse
import os
import statistics

import torch
from torch.profiler import profile

from bayes_router.bench.decode import DECODE_MODEL, EXPERTS, MixRouter, filled_cache, rewind
from bayes_router.core.clock import interleaved_times
from bayes_router.models import BayesianRoutedLM, TinyLMConfig

MIXES = {"full-only": (1.0, 0.0, 0.0), "local-only": (0.0, 0.0, 1.0),
         "50/0/50": (0.5, 0.0, 0.5), "25/50/25": (0.25, 0.5, 0.25)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(2)
    t, steps = args.context, args.steps
    cfg = TinyLMConfig(**{**DECODE_MODEL, "d_model": 64, "window": 16}, max_seq_len=t + steps,
                       experts=EXPERTS)
    torch.manual_seed(0)
    routed = BayesianRoutedLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    cache = filled_cache(routed.lm, args.batch, t, t + steps, g)
    token = torch.zeros(args.batch, 1, dtype=torch.long)

    def step(shares):
        router = MixRouter(shares, 0, routed.decision)

        def run():
            router.reset()
            for _ in range(steps):
                routed.lm(token, router, mode="hard", cache=cache)
            rewind(cache, t)
        return run

    fns = {label: step(shares) for label, shares in MIXES.items()}
    with torch.no_grad():
        times = interleaved_times(fns, args.rounds, 2)
        print(f"D=64, w=16, B={args.batch}, context {t}, {steps} steps per call, "
              f"{args.rounds} rounds, load {os.getloadavg()[0]:.2f}; ms per step: median "
              f"[min, max]")
        for label, seconds in times.items():
            ms = [1e3 * s / steps for s in seconds]
            print(f"  {label}: {statistics.median(ms):.3f} [{min(ms):.3f}, {max(ms):.3f}]")
        for label in ("50/0/50", "full-only"):
            with profile() as prof:
                for _ in range(3):
                    fns[label]()
            print(f"\n{label}, {3 * steps} steps, operators by self time:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
