"""A/B of one expert's kernel against its version at an older commit, in one process.

    .venv/bin/python benchmarks/kernel_ab.py local --rev c7635f5 --shape 2,4,2048,64 --threads 2
    .venv/bin/python benchmarks/kernel_ab.py linear --rev c7635f5 --shape 16,4,128,16 --threads 1

The old module is read with ``git show REV:bayes_router/models/experts/NAME.py`` and loaded
beside the current one; forward and forward + backward of both are timed in interleaved rounds.
Prints medians, minima, their ratios and the load average before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bayes_router.core.validation import validation_enabled
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.experts import build_expert


def old_expert(name: str, rev: str, cfg: TinyLMConfig):
    source = subprocess.run(["git", "show", f"{rev}:bayes_router/models/experts/{name}.py"],
                            capture_output=True, text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"old_{name}", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = next(v for v in vars(module).values()
               if isinstance(v, type) and getattr(v, "name", None) == name)
    return cls.from_config(cfg)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=["full", "linear", "local"])
    p.add_argument("--rev", default="HEAD~1")
    p.add_argument("--shape", default="2,4,2048,64", help="B,H,T,d")
    p.add_argument("--window", type=int, default=None, help="default d")
    p.add_argument("--chunk", type=int, default=None, help="default 2d")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    B, H, T, d = (int(x) for x in args.shape.split(","))
    cfg = TinyLMConfig(d_model=H * d, n_heads=H, max_seq_len=T + 1,
                       window=args.window or d, chunk_size=args.chunk or 2 * d)
    experts = {"old": old_expert(args.name, args.rev, cfg), "new": build_expert(args.name, cfg)}
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, requires_grad=True) for _ in range(3))
    cotangent = torch.randn(B, H, T, d)

    def forward(e):
        def run():
            with torch.no_grad():
                e(q, k, v)
        return run

    fns = {}
    for label, e in experts.items():
        fns[f"{label} fwd"] = forward(e)
        fns[f"{label} fwd+bwd"] = (lambda e=e: torch.autograd.grad(e(q, k, v), (q, k, v),
                                                                     cotangent))
    times = {label: [] for label in fns}
    load = os.getloadavg()[0]
    with validation_enabled(False):
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for label, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
    print(f"{args.name} B,H,T,d={args.shape} threads {args.threads} rounds {args.rounds} "
          f"load {load:.2f} -> {os.getloadavg()[0]:.2f}, old = {args.rev}")
    for kind in ("fwd", "fwd+bwd"):
        old, new = times[f"old {kind}"], times[f"new {kind}"]
        print(f"{kind:8s} old {1e3 * statistics.median(old):8.2f} ms, new "
              f"{1e3 * statistics.median(new):8.2f} ms median: "
              f"{statistics.median(old) / statistics.median(new):.2f}x faster "
              f"(minima {min(old) / min(new):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
