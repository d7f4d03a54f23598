"""``full``: softmax attention over all (causal: all earlier) positions, O(T^2 D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bayes_router.models.experts.base import (
    AttentionExpert,
    KVCache,
    causal_valid,
    gather_rows,
    row_tiles,
)
from bayes_router.models.experts.naive import naive_full

#: Gathered causal rows come from the dense causal SDPA and a gather when they are more than
#: this share of a sequence of at least :data:`DENSE_ROWS_MIN_LEN` positions: the masked row
#: tiles run slower per FLOP than causal SDPA, which skips the masked blocks. Shorter
#: sequences cross over later (the crossover measured in ``docs/experts.md``).
DENSE_ROWS_FROM = 0.6
DENSE_ROWS_MIN_LEN = 1024


class FullAttention(AttentionExpert):
    """Softmax attention over all (causal: all earlier) positions, by
    ``F.scaled_dot_product_attention``; gathered rows go in tiles with the keys cut at the
    tile's last position, or come from the dense attention where they are most of a long
    sequence (:data:`DENSE_ROWS_FROM`)."""

    name = "full"

    def forward(self, q, k, v, positions=None):
        if positions is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        if not self.causal:
            return F.scaled_dot_product_attention(gather_rows(q, positions), k, v)
        if positions.shape[1] == 0:  # no rows: an empty output (still a function of q)
            return gather_rows(q, positions)
        T = q.shape[2]
        if T >= DENSE_ROWS_MIN_LEN and positions.shape[1] > DENSE_ROWS_FROM * T:
            return gather_rows(F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               positions)
        outputs = []
        for rows in row_tiles(positions):
            n_keys = int(rows.max()) + 1  # later keys are masked for every row of the tile
            valid = torch.arange(n_keys, device=q.device) <= rows[:, :, None]  # (B, R, S)
            outputs.append(F.scaled_dot_product_attention(
                gather_rows(q, rows), k[:, :, :n_keys], v[:, :, :n_keys], attn_mask=valid[:, None]
            ))
        return torch.cat(outputs, dim=2)

    def decode(self, state: KVCache, q, k, v, rows=None):
        """Append ``k, v`` to the KV cache, then attend the queries to every cached key of
        their sequence: one attention where every sequence reads and all have one length,
        else one per sequence read, on views of the cache (gathering sequences would copy
        their caches, as much memory traffic as the attention itself)."""
        self.write_state(state, k, v)
        n = None if rows is not None else state.common_length()
        if n is not None:
            return _attend_last(q, state.keys[:, :, :n], state.values[:, :, :n])
        if rows is None:
            rows = torch.arange(k.shape[0], device=k.device)
        outputs = []
        for i, row in enumerate(rows.tolist()):  # a loop over sequences, never positions
            n = int(state.lengths[row])
            outputs.append(_attend_last(q[i:i + 1], state.keys[row:row + 1, :, :n],
                                        state.values[row:row + 1, :, :n]))
        return torch.cat(outputs) if outputs else q[:0]

    def flops_per_token(self, seq_len, d_model, n_heads):
        keys = (seq_len + 1) / 2 if self.causal else seq_len
        return 4.0 * d_model * keys

    def naive(self, q, k, v):
        return naive_full(q, k, v, causal=self.causal)

    def softmax_keys(self, seq_len, device=None):
        return causal_valid(seq_len, self.causal, device)


def _attend_last(q, keys, values):
    """Causal attention of the last ``T`` positions ``q (B, H, T, d)`` of sequences of ``n``
    keys: query ``i`` sees the keys up to ``n - T + i``."""
    T, n = q.shape[2], keys.shape[2]
    if T == 1:
        return F.scaled_dot_product_attention(q, keys, values)
    valid = torch.arange(n, device=q.device) <= torch.arange(n - T, n, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=valid)
