"""The linear expert's two causal forms at two chunks or fewer, in one process: the masked
``T x T`` product against the chunked prefix sums, forward and forward+backward.

    .venv/bin/python benchmarks/linear_quadratic_ab.py 2,4,128,64 16,4,128,16 16,4,256,32

Each shape is ``B,H,T,d`` with the chunk ``C = ceil(T / 2)`` (two chunks); the two forms are
timed in interleaved rounds (median of 20 after 3 warm-up rounds). Where the quadratic form is
slower the scores ``B H T^2`` are past what ``linear.QUADRATIC_SCORES`` lets it take.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from bayes_router.core.clock import interleaved_times
from bayes_router.core.validation import validation_enabled
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.experts import build_expert
from bayes_router.models.experts import linear as linear_module


def time_shape(B: int, H: int, T: int, d: int, rounds: int) -> dict[str, float]:
    """Median ms of both forms, forward and forward+backward, interleaved."""
    if T < 2:
        raise SystemExit(f"T must be >= 2 (two chunks), got {T}")
    # two chunks of ceil(T / 2) (an odd T too); the window is the local expert's, unused here
    expert = build_expert("linear", TinyLMConfig(d_model=H * d, n_heads=H, max_seq_len=T,
                                                 window=1, chunk_size=-(-T // 2)))
    q, k, v = (torch.randn(B, H, T, d, requires_grad=True) for _ in range(3))
    cotangent = torch.randn(B, H, T, d)

    def run(quadratic: bool, backward: bool):
        limit = B * H * T * T if quadratic else 0  # the form the limit lets it take

        def call():
            linear_module.QUADRATIC_SCORES = limit
            if backward:
                expert(q, k, v).backward(cotangent)
            else:
                with torch.no_grad():
                    expert(q, k, v)
        return call

    default = linear_module.QUADRATIC_SCORES
    try:
        with validation_enabled(False):
            times = interleaved_times(
                {f"{form} {step}": run(form == "quadratic", step == "fwd+bwd")
                 for form in ("quadratic", "prefix sums") for step in ("fwd", "fwd+bwd")},
                rounds, warmup=3)
    finally:
        linear_module.QUADRATIC_SCORES = default
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="+", help="B,H,T,d")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load {os.getloadavg()[0]:.2f}")
    for shape in args.shapes:
        B, H, T, d = (int(x) for x in shape.split(","))
        m = time_shape(B, H, T, d, args.rounds)
        print(f"{shape} (scores 2^{(B * H * T * T).bit_length() - 1}): "
              f"fwd {m['quadratic fwd']:.2f} / {m['prefix sums fwd']:.2f} ms = "
              f"{m['quadratic fwd'] / m['prefix sums fwd']:.2f}, fwd+bwd "
              f"{m['quadratic fwd+bwd']:.2f} / {m['prefix sums fwd+bwd']:.2f} ms = "
              f"{m['quadratic fwd+bwd'] / m['prefix sums fwd+bwd']:.2f}")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
