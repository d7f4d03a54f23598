"""The FLOP cost model and the cost vector of the compute-aware prior.

FLOPs per query token (multiply-add = 2 FLOPs) of the attention *core* as our kernels execute it
(score and value products; feature maps and softmax are lower order and left out), plus
optionally the q/k/v/out projections ``8 D^2``. See ``docs/experts.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayes_router.models.experts.registry import build_expert, expert_spec

SEED_COSTS = {"full": 1.0, "linear": 0.15, "local": 0.30}


def projection_flops_per_token(d_model: int) -> float:
    """q, k, v and out projections: four ``D x D`` products, 2 FLOPs per multiply-add."""
    return 8.0 * d_model * d_model


def expert_flops(cfg, seq_len: int | None = None, include_projections: bool | None = None
                 ) -> dict[str, float]:
    """FLOPs per query token of every expert of ``cfg`` at ``seq_len`` (default ``max_seq_len``)."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    if include_projections is None:
        include_projections = cfg.cost_includes_projections
    extra = projection_flops_per_token(cfg.d_model) if include_projections else 0.0
    return {name: build_expert(name, cfg).flops_per_token(seq_len, cfg.d_model, cfg.n_heads) + extra
            for name in cfg.experts}


def cost_vector(cfg, seq_len: int | None = None, preset: str | None = None) -> Tensor:
    """Relative cost ``c[k]`` of each expert of ``cfg``, normalised so that ``full = 1``.

    ``preset="flops"`` (default from ``cfg.cost_preset``) uses the FLOP model at ``seq_len``;
    ``preset="seed"`` gives the paper prototype's fixed ``[1.0, 0.15, 0.30]``. Experts registered
    with a ``fixed_cost`` use it in both presets. Without a ``full`` expert the costs are relative
    to the most expensive one.
    """
    preset = cfg.cost_preset if preset is None else preset
    if preset == "seed":
        unknown = [n for n in cfg.experts if n not in SEED_COSTS and
                   expert_spec(n).fixed_cost is None]
        if unknown:
            raise ValueError(f"preset 'seed' has no cost for experts {unknown}")
        costs = [expert_spec(n).fixed_cost or SEED_COSTS[n] for n in cfg.experts]
        return torch.tensor(costs, dtype=torch.float32)
    if preset != "flops":
        raise ValueError(f"preset must be one of ['flops', 'seed'], got {preset!r}")
    flops = expert_flops(cfg, seq_len)
    reference = flops.get("full", max(flops.values()))
    costs = [expert_spec(n).fixed_cost or flops[n] / reference for n in cfg.experts]
    return torch.tensor(costs, dtype=torch.float32)
