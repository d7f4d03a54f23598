"""Rotary position embeddings (Su et al. 2021, "RoFormer"; the LLaMA convention).

Each head's query and key at position ``t`` are rotated pairwise by the angles ``t *
theta_i``, ``theta_i = base^(-2i / d)``, pairing dimension ``i`` with ``i + d / 2`` (the
"rotate half" layout of LLaMA's reference code and Hugging Face). A score ``<R_m q, R_n k>``
then depends on the positions only through ``m - n``, so a model has no table of positions
that caps its context: it decodes past its training length (how well is an empirical question).
Keys are cached rotated.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The base of the rotation frequencies (LLaMA's).
ROTARY_BASE = 10000.0


def rotary_angles(positions: Tensor, head_dim: int, dtype: torch.dtype,
                  base: float = ROTARY_BASE) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of ``positions[..., None] * theta`` ``(..., d / 2)``, computed in
    float32 at least (float64 for float64 heads) and cast to ``dtype``.

    :param positions: integer positions, e.g. ``(B, T)`` or ``(T,)``.
    :param head_dim: ``d``, even.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    theta = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=work)
                     / head_dim)
    angles = positions.to(work)[..., None] * theta
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x (B, H, T, d)`` by angles whose ``cos, sin`` are ``(B, T, d / 2)`` or
    ``(T, d / 2)``: ``[x1 cos - x2 sin, x2 cos + x1 sin]`` with ``x1, x2`` the two halves."""
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # x's dtype, whatever autocast made it
    if cos.dim() == 3:  # (B, T, d / 2) -> (B, 1, T, d / 2), broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
