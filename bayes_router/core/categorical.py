"""Divergences between categorical distributions given by logits (the routing damage).

Torch in, torch out (differentiable); arrays in, float64 arrays out.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from bayes_router.core.arrays import to_numpy


def kl_divergence_categorical(p_logits, q_logits):
    """Per-row ``KL(softmax(p_logits) || softmax(q_logits))`` in nats, reducing the last axis.

    Computed from ``log_softmax`` of both (stable for large logits; ``-inf`` logits allowed, a
    class with ``p = 0`` contributes 0). For routing damage pass the soft-routing logits as ``p``
    and the hard-routing logits as ``q``. Tensors in give tensors out (differentiable); arrays in
    give float64 arrays. Tiny negative values from rounding are clamped to 0.

    :param p_logits: logits ``(..., C)``.
    :param q_logits: logits of the same shape.
    """
    as_tensor = isinstance(p_logits, Tensor) or isinstance(q_logits, Tensor)
    p, q = (_logits(x, name) for x, name in ((p_logits, "p_logits"), (q_logits, "q_logits")))
    if p.shape != q.shape:
        raise ValueError(f"p_logits and q_logits must share a shape, got {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")
    log_p = torch.log_softmax(p, dim=-1)
    log_q = torch.log_softmax(q, dim=-1)
    prob_p = log_p.exp()
    # mask the log-ratio (not the product) so that classes with p = 0 get zero, not NaN, gradients
    log_ratio = torch.where(prob_p > 0, log_p - log_q, torch.zeros_like(prob_p))
    kl = (prob_p * log_ratio).sum(-1).clamp_min(0.0)
    return kl if as_tensor else kl.numpy()


def _logits(x, name: str) -> Tensor:
    if isinstance(x, Tensor):
        tensor = x if x.is_floating_point() else x.double()
    else:
        tensor = torch.from_numpy(to_numpy(x, name).astype(np.float64))
    if tensor.dim() == 0 or tensor.shape[-1] == 0 or tensor.numel() == 0:
        raise ValueError(f"{name} must be non-empty with a last (class) axis, got shape "
                         f"{tuple(tensor.shape)}")
    if torch.isnan(tensor).any() or (tensor == float("inf")).any():
        raise ValueError(f"{name} contains NaN or +Inf")
    if (tensor == float("-inf")).all(-1).any():
        raise ValueError(f"{name} has a row whose logits are all -inf")
    return tensor
