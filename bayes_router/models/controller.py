"""The routing controller: the per-token features a router reads, and the MLP that reads them.

Every routed layer hands its router :func:`controller_features` of its input, ``[h_t, ||h_t||,
position]``; a learned router maps them through one :class:`Controller` per layer to ``K``
outputs (the guide's concentrations, or the prior-free router's logits). A static router reads
only the position back with :func:`feature_position`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def controller_features(h: Tensor, max_seq_len: int, positions: Tensor | None = None,
                        scheme: str = "learned") -> Tensor:
    """Features ``[h_t, ||h_t|| / sqrt(D) (detached), position feature]`` -> ``(..., T, D+2)``.

    The position feature is ``t / (max_seq_len - 1)`` (``scheme="learned"``: positions stop at
    ``max_seq_len``) or ``log(1 + t) / log(max_seq_len)`` (``"rotary"``: 1 at the last
    training position, growing slowly past it). It depends only on ``t``, so a token's features
    do not change when later tokens arrive. ``positions (B, T)``: each token's ``t`` (decoding,
    where a sequence continues from its own length); default ``0 .. T - 1``.
    """
    T = h.shape[-2]
    if scheme == "learned":
        last = T - 1 if positions is None else int(positions.max()) if positions.numel() else -1
        if last >= max_seq_len:
            raise ValueError(f"position {last} is past the model's max_seq_len={max_seq_len} "
                             f"(positions 0 .. {max_seq_len - 1})")
    return _controller_features(h, max_seq_len, positions, scheme)


def _controller_features(h: Tensor, max_seq_len: int, positions: Tensor | None = None,
                         scheme: str = "learned") -> Tensor:
    """:func:`controller_features` of positions already checked (the LM checks them once per
    pass, not once per layer: reading ``positions.max()`` is a device synchronisation)."""
    T, D = h.shape[-2:]
    norm = (h.detach().norm(dim=-1, keepdim=True) / D**0.5)
    if positions is None:
        position = torch.arange(T, device=h.device, dtype=h.dtype)[:, None]
    else:
        position = positions.to(h.dtype)[..., None]
    if scheme == "learned":
        position = position / (max_seq_len - 1)
    else:
        position = torch.log1p(position) / math.log(max_seq_len)
    return torch.cat([h, norm, position.expand(*h.shape[:-1], 1)], dim=-1)


def feature_position(feature: Tensor, max_seq_len: int, scheme: str = "learned") -> Tensor:
    """The integer position of a token from its position feature (the inverse of
    :func:`controller_features`' last column; exact after rounding in float32 to beyond
    ``2^20`` positions)."""
    if scheme == "learned":
        position = feature.double() * (max_seq_len - 1)
    else:
        position = torch.expm1(feature.double() * math.log(max_seq_len))
    return position.round().long()


class Controller(nn.Module):
    """The routing controller: an MLP from features ``(..., F)`` to ``K`` outputs."""

    def __init__(self, in_dim: int, hidden: int, n_experts: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_experts))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)
