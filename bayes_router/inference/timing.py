"""Step-time measurement: a Bayesian SVI step against a prior-free step of the same LM.

The three step kinds (Bayesian with the one-pass memo, the naive two-pass Bayesian pair, and the
prior-free router) are timed interleaved, round by round, so that machine noise hits all of them
alike; the reported ratios are of medians.
"""

from __future__ import annotations

import statistics

import pyro
import torch

from bayes_router.core.clock import interleaved_times
from bayes_router.core.optim import adamw
from bayes_router.inference.estimators import get_estimator
from bayes_router.inference.objective import svi_step
from bayes_router.models.bayesian import BayesianRoutedLM, PriorFreeRoutedLM
from bayes_router.models.config import TinyLMConfig


def svi_step_times(cfg: TinyLMConfig, batch_size: int = 16, seq_len: int | None = None,
                   estimator: str = "reparam-analytic", repeats: int = 10, warmup: int = 2,
                   seed: int = 0, extra_steps=None) -> dict:
    """Median seconds of one optimiser step (loss, backward, AdamW update) for each step kind.

    :param extra_steps: ``extra_steps(cfg, x, y) -> {kind: step}``, more steps on the same batch
        timed in the same round-robin (a baseline LM), reported as ``<kind>_s``.
    :returns: ``{"bayesian_s", "bayesian_two_pass_s", "prior_free_s", "ratio",
        "two_pass_ratio", ...}`` with ``ratio = bayesian_s / prior_free_s``, and
        ``<kind>_min_s`` / ``<kind>_max_s`` beside every median.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    with pyro.settings.context(module_local_params=True):
        torch.manual_seed(seed)
        bayes = BayesianRoutedLM(cfg, estimator=get_estimator(estimator))
        two_pass = BayesianRoutedLM(cfg, estimator=get_estimator(estimator))
        two_pass.load_state_dict(bayes.state_dict())
        two_pass.one_pass = False
        prior_free = PriorFreeRoutedLM(cfg)
        elbo = get_estimator(estimator).make_elbo(max_plate_nesting=1)
        plain = get_estimator("reparam-mc").make_elbo(max_plate_nesting=1)
        x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len))
        y = torch.randint(0, cfg.vocab_size, (batch_size, seq_len))
        kinds = {
            "bayesian": (bayes, elbo),
            "bayesian_two_pass": (two_pass, elbo),
            "prior_free": (prior_free, plain),
        }
        optimisers = {k: adamw(m.parameters(), lr=1e-4) for k, (m, _) in kinds.items()}

        def step(kind: str):
            model, objective = kinds[kind]
            return lambda: svi_step(objective, model, x, y, optimisers[kind], dataset_size=1000)

        steps = {kind: step(kind) for kind in kinds}
        if extra_steps is not None:
            steps.update(extra_steps(cfg, x, y))
        times = interleaved_times(steps, repeats, warmup)
    medians = {f"{kind}_s": float(statistics.median(t)) for kind, t in times.items()}
    medians.update({f"{kind}_min_s": float(min(t)) for kind, t in times.items()})
    medians.update({f"{kind}_max_s": float(max(t)) for kind, t in times.items()})
    return {**medians,
            "ratio": medians["bayesian_s"] / medians["prior_free_s"],
            "two_pass_ratio": medians["bayesian_two_pass_s"] / medians["prior_free_s"],
            "batch_size": batch_size, "seq_len": seq_len, "estimator": estimator,
            "repeats": repeats, "config": cfg.to_dict()}
