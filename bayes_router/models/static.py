"""Static routing baselines: allocations fixed before training, through the routed LMs' code path.

A static router has no controller and no latent variables: its Pyro model has only the ``obs``
site (like the prior-free router), so the same SVI loop trains it on the log-likelihood, and the
same evaluation, timing and reports apply. Three kinds, named by a router spec:

``fixed:<expert>``
    every token of every layer on one expert (one-hot);
``fixed:<s_1>,...,<s_K>``
    constant *hard* shares in the order of ``cfg.experts``: in every layer a random permutation
    of the positions ``0 .. max_seq_len - 1`` (drawn once from ``seed``, different per layer)
    gives the first ``round(s_1 * max_seq_len)`` positions to expert 1, the next to expert 2,
    and so on. The assignment depends on the position only, so it is the same for every
    sequence and shares are exact at ``T = max_seq_len``. With rotary positions a model reads
    past ``max_seq_len``; there the assignment repeats with period ``max_seq_len`` (position
    ``p`` takes row ``p mod max_seq_len``), so shares stay exact over every whole period;
``soft:<s_1>,...,<s_K>``
    every token mixed with the constant weights ``s`` (a soft static mix).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bayes_router.core.dirichlet import normalised_entropy
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.controller import feature_position
from bayes_router.models.routed_lm import DeterministicRoutedLM
from bayes_router.models.router import RoutingDecision

STATIC_KINDS = ("fixed", "soft")


def parse_static_router(spec: str, experts: tuple[str, ...]) -> tuple[str, tuple[float, ...]]:
    """``(kind, shares)`` of a static router spec (see the module docstring).

    :raises ValueError: for an unknown kind or expert, shares of the wrong length, negative or
        not summing to 1.
    """
    kind, sep, body = spec.partition(":")
    if kind not in STATIC_KINDS or not sep or not body:
        raise ValueError(f"router: a static router is 'fixed:<expert>', "
                         f"'fixed:<shares>' or 'soft:<shares>', got {spec!r}")
    if body in experts:
        if kind == "soft":
            raise ValueError(f"router: {spec!r} is a one-expert router; write 'fixed:{body}'")
        return "fixed", tuple(float(e == body) for e in experts)
    try:
        shares = tuple(float(v) for v in body.split(","))
    except ValueError:
        raise ValueError(f"router: {spec!r} names neither an expert of {list(experts)} nor "
                         f"comma-separated shares") from None
    if len(shares) != len(experts):
        raise ValueError(f"router: {spec!r} gives {len(shares)} shares for the "
                         f"{len(experts)} experts {list(experts)} (one each, in that order)")
    if not all(math.isfinite(s) and s >= 0 for s in shares) or abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"router: the shares of {spec!r} must be >= 0 and sum to 1, got sum "
                         f"{sum(shares):.6g}")
    return kind, shares


def hard_assignment(shares: tuple[float, ...], length: int, n_layers: int, seed: int) -> Tensor:
    """``(n_layers, length)`` expert index per position: exact shares, random positions."""
    counts = [round(s * length) for s in shares]
    counts[max(range(len(shares)), key=lambda k: shares[k])] += length - sum(counts)
    experts = torch.repeat_interleave(torch.arange(len(shares)), torch.tensor(counts))
    g = torch.Generator().manual_seed(seed)
    return torch.stack([experts[torch.randperm(length, generator=g)] for _ in range(n_layers)])


class StaticRoutedLM(DeterministicRoutedLM):
    """The LM under a static routing (see the module docstring), trained on the
    log-likelihood; it has no controllers.

    :param spec: the router spec, e.g. ``"fixed:full"``, ``"fixed:0.2,0.5,0.3"``,
        ``"soft:0.2,0.5,0.3"``.
    :param seed: seed of the hard-share assignment (the run's seed).
    """

    kind = "static"

    def __init__(self, cfg: TinyLMConfig, spec: str, seed: int = 0, costs: Tensor | None = None):
        super().__init__(cfg, costs, controllers=False)
        self.spec = spec
        self.static_kind, shares = parse_static_router(spec, cfg.experts)
        self.shares = shares
        if self.static_kind == "fixed":
            index = hard_assignment(shares, cfg.max_seq_len, cfg.n_layers, seed)
            weights = torch.nn.functional.one_hot(index, cfg.n_experts).float()
        else:
            weights = torch.tensor(shares).expand(cfg.n_layers, cfg.max_seq_len, cfg.n_experts)
        self.register_buffer("weights", weights.clone())  # (L, max_seq_len, K)

    def decision(self, layer: int, features: Tensor, gate_measure: str = "total"
                 ) -> RoutingDecision:
        if gate_measure != "total":
            raise ValueError("a static router has a single uncertainty measure: gate_measure "
                             "must be 'total'")
        # each token's position, from its position feature: decoding asks for one token at a
        # time, anywhere in a sequence
        position = feature_position(features[..., -1], self.cfg.max_seq_len,
                                    self.cfg.positions)
        table = self.weights[layer]  # (max_seq_len, K)
        # past max_seq_len (rotary positions only) the assignment repeats with its period
        position = position.remainder(table.shape[0])
        w = table[position].to(features.dtype)  # (..., T, K)
        uncertainty = (normalised_entropy(w) if self.cfg.n_experts > 1
                       else torch.zeros(w.shape[:-1], dtype=w.dtype))
        return RoutingDecision(weights=w, mean=w, uncertainty=uncertainty)
