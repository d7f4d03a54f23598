"""Hard routing of short sequences: the softmax experts share one attention.

Below a crossover length the sparse path's bookkeeping (per-expert row layouts, gathers and
scatters) costs more than the attention it skips. There the tokens routed to a softmax
expert (full, local: those with
:meth:`~bayes_router.models.experts.base.AttentionExpert.softmax_keys`) go through one
``scaled_dot_product_attention`` over the whole sequence, each query row masked to the keys of
*its* expert: one score matrix and one softmax for all of them, full attention's cost whatever
their mix. The other experts (linear) keep their own paths.

Below the crossover the softmax experts' rows then cost about what full-only costs and save
nothing; the saving of a cheaper softmax expert (local) is real only above it, on the sparse
path (:class:`~bayes_router.models.router.RoutedAttention`). ``docs/experts.md`` gives the
measured crossover.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from bayes_router.models.experts.base import AttentionExpert, additive_mask


def softmax_experts(experts: Sequence[AttentionExpert]) -> list[int]:
    """Indices of the experts that are softmax attention over a key mask."""
    return [e for e, expert in enumerate(experts) if expert.softmax_keys(1) is not None]


def row_masks(experts: Sequence[AttentionExpert], seq_len: int, dtype: torch.dtype,
              device) -> Tensor:
    """``(E, T, T)`` additive masks: expert ``e``'s keys for a softmax expert, every key for
    the others (their rows are computed, then dropped)."""
    everything = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    keys = [expert.softmax_keys(seq_len, device) for expert in experts]
    return torch.stack([additive_mask(everything if valid is None else valid, dtype)
                        for valid in keys])


def shared_softmax(q: Tensor, k: Tensor, v: Tensor, index: Tensor, masks: Tensor,
                   experts: Sequence[int]) -> Tensor:
    """The rows of ``q, k, v (B, H, T, d)`` routed to the softmax ``experts``, each by its own
    expert, through one attention; zero on every other row.

    :param index: ``(B, T)`` integer, the expert of each query row.
    :param masks: :func:`row_masks` of the layer's experts for this ``T``.
    :returns: ``(B, H, T, d)``.
    """
    T = q.shape[2]
    mask = masks[index, torch.arange(T, device=q.device)][:, None]  # (B, 1, T, T)
    rows = sum(index == e for e in experts)[:, None, :, None].to(q.dtype)  # (B, 1, T, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * rows
