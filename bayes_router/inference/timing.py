"""Step-time measurement: a Bayesian SVI step against a prior-free step of the same LM, and a
decoding step against the full-only decoding step.

The variants of each comparison are timed interleaved, round by round
(:func:`~bayes_router.core.clock.interleaved_times`), so that machine noise hits all of them
alike; the reported ratios are of medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping

import pyro
import torch
import torch.nn.functional as F
from torch import Tensor

from bayes_router.core.clock import interleaved_times
from bayes_router.core.optim import adamw
from bayes_router.core.validation import check_int
from bayes_router.inference.estimators import get_estimator
from bayes_router.inference.objective import StepOptions, svi_step
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.prior_free import PriorFreeRoutedLM
from bayes_router.models.routed_lm import RoutedLM
from bayes_router.models.router import ROUTING_MODES, Router, RoutingDecision
from bayes_router.models.tinylm import DecodeCache, LMOutput

#: The label of the reference variant of :func:`decode_step_times`.
FULL_ONLY = "full_only"
#: Teacher-forced decoding steps per timed call of :func:`decode_step_times`.
DECODE_STEPS = 8


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
        options = StepOptions(dataset_size=1000)

        def step(kind: str):
            model, objective = kinds[kind]
            return lambda: svi_step(objective, model, x, y, optimisers[kind], options)

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


def reference_expert(model: RoutedLM) -> int:
    """Index of the expert of the full-only reference: ``full``, or, in an LM without it, the
    most expensive expert by ``model.costs``."""
    if "full" in model.cfg.experts:
        return model.cfg.experts.index("full")
    return int(model.costs.argmax())


def full_only_router(model: RoutedLM) -> Router:
    """A router sending every token of every layer to :func:`reference_expert`, one-hot (run
    it in ``hard`` mode): the same LM as a plain transformer, its controllers never run."""
    index, n_experts = reference_expert(model), model.cfg.n_experts

    def router(layer: int, features: Tensor) -> RoutingDecision:
        chosen = torch.full(features.shape[:-1], index, device=features.device)  # (..., T)
        weights = F.one_hot(chosen, n_experts).to(features.dtype)  # (..., T, K)
        return RoutingDecision(weights=weights, mean=weights)
    return router



@torch.no_grad()
def decode_step_times(model: RoutedLM, x: Tensor, modes: Mapping[str, tuple[str, float | None]],
                      context: int, steps: int = DECODE_STEPS, repeats: int = 5,
                      warmup: int = 1, gate_measure: str = "total") -> dict[str, list[float]]:
    """Seconds per decoding step, from a cache of ``context`` real tokens, of each routing in
    ``modes`` and of the full-only reference (:data:`FULL_ONLY`, :func:`full_only_router`).

    Every variant prefills ``x[:, :context]`` into its own cache once (under its own routing);
    each timed call then feeds the next ``steps`` tokens ``x[:, context + i]`` one at a time
    (teacher forcing) and rewinds the cache to ``context`` tokens. The calls of all variants are
    interleaved round by round (:func:`~bayes_router.core.clock.interleaved_times`); a CUDA
    call is timed to completion.

    .. warning:: The rewind moves the lengths back and keeps the states' contents (as the
        decoding benchmark does): the next steps overwrite the key/value caches, but the linear
        expert's running sums keep the rewound tokens. The outputs after the first call are
        not a true decode's, and neither are the hidden states a learned router reads in the
        layers above the first, so its decisions in later calls may differ from a true
        decode's; each timed step costs what a step with those decisions costs.

    :param x: ``(B, >= context + steps)`` token ids, e.g. validation windows.
    :param modes: ``{label: (mode, gate_threshold)}`` the routings to time (``soft``, ``hard``
        or ``gated``), read by :meth:`~bayes_router.models.routed_lm.RoutedLM.predict`.
    :param context: tokens cached per sequence before the timed steps (>= 1).
    :param steps: teacher-forced steps per timed call (>= 1).
    :param gate_measure: the uncertainty gated routing reads.
    :returns: ``{label: [seconds per step, one per repeat]}`` for every label of ``modes``
        and :data:`FULL_ONLY`.
    :raises ValueError: for a context or steps below 1, ``context + steps`` past ``x``'s
        length or the model's ``max_seq_len``, an unknown mode, or a label :data:`FULL_ONLY`.
    """
    check_int("context", context)
    check_int("steps", steps)
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a (B, T) tensor of token ids, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    end = context + steps
    if end > x.shape[1]:
        raise ValueError(f"context + steps = {context} + {steps} must be <= x's length "
                         f"{x.shape[1]} (the steps feed the tokens after the context)")
    limit = model.cfg.max_context  # None: rotary positions, no cap
    if limit is not None and end > limit:
        raise ValueError(f"context + steps = {context} + {steps} must be <= max_seq_len="
                         f"{limit} (the positions the model supports)")
    if FULL_ONLY in modes:
        raise ValueError(f"modes must not use the label {FULL_ONLY!r}: the reference is "
                         f"always timed under it")
    for label, (mode, _) in modes.items():
        if mode not in ROUTING_MODES:
            raise ValueError(f"modes[{label!r}]: mode must be one of {list(ROUTING_MODES)}, "
                             f"got {mode!r}")
    model.eval()
    device = model.lm.token_embedding.weight.device
    x = x[:, :end].to(device)  # (B, context + steps)
    model.lm.check_tokens(x)
    synchronise = (torch.cuda.synchronize if device.type == "cuda"
                   else (lambda: None))  # time the device's work, not its queueing

    def timed(forward: Callable[[Tensor, DecodeCache], LMOutput]) -> Callable[[], None]:
        cache = model.lm.new_cache(x.shape[0], capacity=end)
        forward(x[:, :context], cache)  # the prefill, once

        def call():
            for i in range(steps):
                forward(x[:, context + i:context + i + 1], cache)  # (B, 1)
            synchronise()
            cache.set_lengths(torch.full_like(cache.lengths, context))
        return call

    def routed(mode: str, threshold: float | None):
        return lambda tokens, cache: model.predict(tokens, mode, threshold, gate_measure,
                                                   cache=cache)

    reference = full_only_router(model)
    fns = {label: timed(routed(mode, threshold)) for label, (mode, threshold) in modes.items()}
    fns[FULL_ONLY] = timed(lambda tokens, cache: model.lm(tokens, reference, mode="hard",
                                                          cache=cache))
    times = interleaved_times(fns, repeats, warmup)
    return {label: [s / steps for s in seconds] for label, seconds in times.items()}
