"""The Bayesian SVI step in float32 against bfloat16 autocast, interleaved in one process.

    python benchmarks/precision_step.py [--threads 2] [--repeats 10]

Prints min and median seconds per step and the bfloat16/float32 ratio of medians at the Phase-1
size and at D=128, L=4, T=256 (batch 16, after 2 warm-up rounds), with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics

import pyro
import torch

from bayes_router.core.clock import interleaved_times
from bayes_router.inference.estimators import get_estimator
from bayes_router.inference.objective import StepOptions, svi_step
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig

SIZES = {"phase1": TinyLMConfig.phase1(98),
         "D128 L4 T256": TinyLMConfig(vocab_size=98, d_model=128, n_layers=4, max_seq_len=256,
                                      window=32, chunk_size=64)}


def _step(elbo, model, x, y):
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    options = StepOptions(dataset_size=1000)
    return lambda: svi_step(elbo, model, x, y, optimiser, options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with pyro.settings.context(module_local_params=True):
        for size, cfg in SIZES.items():
            torch.manual_seed(0)
            models = {dtype: BayesianRoutedLM(cfg) for dtype in ("float32", "bfloat16")}
            models["bfloat16"].load_state_dict(models["float32"].state_dict())
            models["bfloat16"].set_precision("bfloat16")
            elbo = get_estimator("reparam-analytic").make_elbo(max_plate_nesting=1)
            x, y = (torch.randint(0, cfg.vocab_size, (16, cfg.max_seq_len)) for _ in range(2))

            steps = {dtype: _step(elbo, m, x, y) for dtype, m in models.items()}
            times = interleaved_times(steps, args.repeats, warmup=2)
            summary = {d: f"min {min(t):.4f} s, median {statistics.median(t):.4f} s"
                       for d, t in times.items()}
            ratio = statistics.median(times["bfloat16"]) / statistics.median(times["float32"])
            print(f"{size}: {summary}; bfloat16 / float32 {ratio:.2f}; "
                  f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
