"""The hard-routed layer at short lengths: the shared softmax path against the per-expert sparse
paths (``dense_hard_max_len=0``), in one process, interleaved.

    python benchmarks/short_hard_ab.py 128 256 512 1024

For each length: the forward time of every mix over the full-only layer's, for the sparse paths
and the shared path side by side (B=2, D=256, H=4, w=64, chunk 64, the bench's layer; median of
9 rounds after 2 warm-up rounds, 5 from T=2048), with the load average. The length where the
shared path stops winning is the crossover ``TinyLMConfig.dense_hard_max_len`` encodes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics

import torch

from bayes_router.bench.harness import one_hot_mix
from bayes_router.core.clock import interleaved_times
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.router import RoutedAttention

MIXES = [(1, 0, 0), (0.25, 0.5, 0.25), (0, 1, 0), (0, 0, 1), (0.5, 0, 0.5), (0, 0.5, 0.5),
         (0.5, 0.5, 0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lengths", type=int, nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    cfg = TinyLMConfig(d_model=256, n_heads=4, window=64, chunk_size=64,
                       max_seq_len=max(args.lengths) + 1,
                       dense_hard_max_len=max(args.lengths))
    torch.manual_seed(0)
    shared = RoutedAttention(cfg)
    sparse = RoutedAttention(dataclasses.replace(cfg, dense_hard_max_len=0))
    sparse.load_state_dict(shared.state_dict())
    for T in args.lengths:
        x = torch.randn(2, T, cfg.d_model, generator=generator)
        fns = {}
        for mix in MIXES:
            weights = one_hot_mix(2, T, mix, generator)[0]
            label = "/".join(f"{s:g}" for s in mix)
            fns[f"sparse {label}"] = (lambda w=weights, x=x: sparse(x, w, sparse=True))
            fns[f"shared {label}"] = (lambda w=weights, x=x: shared(x, w, sparse=True))
        with torch.no_grad():
            times = interleaved_times(fns, 9 if T < 2048 else 5, warmup=2)
        reference = statistics.median(times["sparse 1/0/0"])
        ratios = {k: statistics.median(t) / reference for k, t in times.items()}
        print(f"T={T}: full-only {reference * 1e3:.2f} ms, load {os.getloadavg()[0]:.2f}")
        for mix in MIXES[1:]:
            label = "/".join(f"{s:g}" for s in mix)
            print(f"  {label:>14}: sparse {ratios[f'sparse {label}']:.2f}  "
                  f"shared {ratios[f'shared {label}']:.2f}")


if __name__ == "__main__":
    main()
