"""Time the attention experts and the hard-routed layer on this machine; print the table.

Usage::

    .venv/bin/python benchmarks/bench_experts.py --out runs/bench
    .venv/bin/python benchmarks/bench_experts.py --out /tmp/bench --seq-lens 128 512 \
        --hard-seq-len 512

Writes ``<out>/bench.json`` (see ``bayes_router.bench.CONVENTIONS`` for what each number means).
"""

from __future__ import annotations

import argparse
import logging

from bayes_router.bench import BenchConfig, format_table, run_benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench", help="output folder for bench.json")
    parser.add_argument("--seq-lens", type=int, nargs="+",
                        default=[128, 256, 512, 1024, 2048, 4096],
                        help="sequence lengths at which every expert is timed")
    parser.add_argument("--hard-seq-len", type=int, default=4096,
                        help="sequence length of the hard-routed layer benchmark")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = BenchConfig(seq_lens=tuple(args.seq_lens), batch=args.batch, d_model=args.d_model,
                         n_heads=args.n_heads, window=args.window, repeats=args.repeats,
                         hard_seq_len=args.hard_seq_len)
    results = run_benchmark(args.out, config, progress=not args.no_progress)
    print(format_table(results))
    print(f"\nwrote {args.out}/bench.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
