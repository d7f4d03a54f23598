"""``local``: softmax attention over a sliding window, O(T w D)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bayes_router.core.validation import check_int
from bayes_router.models.experts.base import (
    AttentionExpert,
    ExpertState,
    additive_mask,
    block_layout,
    gather_rows,
    pad_rows,
    valid_counts,
)
from bayes_router.models.experts.naive import naive_local


@dataclass
class WindowCache(ExpertState):
    """The keys and values of the last ``w + 1`` tokens of every sequence, ``(B, H, w + 1,
    d)`` each, a ring: position ``p`` sits in slot ``p mod (w + 1)``. Constant memory: a
    causal query at ``t`` reads ``[t - w, t]``, and softmax attention does not depend on the
    order of its keys."""

    keys: Tensor
    values: Tensor

    @property
    def slots(self) -> int:
        return self.keys.shape[2]

    def write(self, k: Tensor, v: Tensor, counts: Tensor | None = None) -> None:
        """Append ``k, v (B, H, T, d)``, the first ``counts[b]`` of sequence ``b`` real (all
        by default): the last ``w + 1`` real ones of each sequence go to their slots."""
        B, H, T, d = k.shape
        S = self.slots
        common = self.common_length()
        if T == 1 and counts is None and common is not None:  # a step: one slot for all
            self.keys[:, :, common % S] = k[:, :, 0]
            self.values[:, :, common % S] = v[:, :, 0]
        elif T == 1 and counts is None:  # a step: one slot per sequence
            slot = self.lengths % S
            self.keys.transpose(1, 2)[torch.arange(B, device=k.device), slot] = k[:, :, 0]
            self.values.transpose(1, 2)[torch.arange(B, device=k.device), slot] = v[:, :, 0]
        elif T:
            if counts is None:
                counts = torch.full((B,), T, dtype=torch.long, device=k.device)
            last = counts[:, None] - S + torch.arange(S, device=k.device)  # (B, S) new index
            keep = (last >= 0)[:, None, :, None]
            slot = ((self.lengths[:, None] + last) % S)[:, None, :, None].expand(B, H, S, d)
            index = last.clamp(min=0)[:, None, :, None].expand(B, H, S, d)
            for ring, new in ((self.keys, k), (self.values, v)):  # S consecutive positions:
                # S distinct slots, so the scatter has no collisions
                ring.scatter_(2, slot, torch.where(keep, new.gather(2, index),
                                                   ring.gather(2, slot)))
        self.advance(T, counts)

    def in_order(self, count: int) -> tuple[Tensor, Tensor]:
        """The keys and values of the last ``count`` tokens (``<= w + 1``, sequences of one
        length), in position order: ``(B, H, count, d)`` each."""
        n = int(self.lengths[0])
        slot = torch.arange(n - count, n, device=self.keys.device) % self.slots
        return self.keys[:, :, slot], self.values[:, :, slot]


def _window_valid(key_pos: Tensor, query_pos: Tensor, seq_len: int, window: int,
                  causal: bool) -> Tensor:
    """Which keys a query sees: inside the sequence and within ``[q - w, q]`` (causal) or
    ``[q - w, q + w]``; broadcasts ``key_pos`` against ``query_pos``."""
    offset = key_pos - query_pos
    valid = (key_pos >= 0) & (key_pos < seq_len) & (offset >= -window)
    return valid & (offset <= 0) if causal else valid & (offset <= window)


def _block_key_positions(n_blocks: int, block: int, n_keys: int, front: int, device
                         ) -> Tensor:
    """``(n, 1, S)`` positions of the keys each block attends, from ``front`` before it on."""
    return (torch.arange(n_blocks, device=device)[:, None, None] * block - front
            + torch.arange(n_keys, device=device))


@functools.lru_cache(maxsize=16)
def _local_block_mask(n_blocks: int, block: int, n_keys: int, seq_len: int, window: int,
                      causal: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive mask ``(n_blocks, block, n_keys)`` of the dense blocked kernel (cached: it
    depends only on the shapes; callers must not modify it)."""
    query_pos = (torch.arange(n_blocks, device=device)[:, None, None] * block
                 + torch.arange(block, device=device)[:, None])  # (n, P, 1)
    key_pos = _block_key_positions(n_blocks, block, n_keys, window, device)
    return additive_mask(_window_valid(key_pos, query_pos, seq_len, window, causal), dtype)


#: Score entries (query rows x window keys) per tile of the dense kernel: ~1 MB of float32,
#: so that scores, probabilities and their gradients stay in cache while a tile is processed.
SCORE_TILE = 1 << 18

#: Hard-routed rows run the dense kernel and gather its rows when some block holds more than
#: this share of its ``P`` queries (``M > 0.5 P``): the crossover of the two, measured at
#: T = 4096, ``w = 64`` and T = 512, ``w = 16`` (``docs/experts.md``).
DENSE_ROWS_FROM = 0.5

#: The smallest window whose dense kernel runs blocks of ``w / 2`` queries (see
#: :meth:`LocalAttention.block_size`).
HALF_BLOCKS_FROM = 64


def _flat_keys(k: Tensor, v: Tensor, window: int, causal: bool, block: int
               ) -> tuple[Tensor, Tensor, int, int]:
    """The keys (scaled by ``1 / sqrt(d)``) and values as flat padded rows ``(w + G n P
    (+ w), d)`` (:func:`~bayes_router.models.experts.base.pad_rows`), the blocks per sequence
    ``n`` and the window length ``S = P + w`` (``P + 2w`` bidirectional): block ``j`` of
    sequence ``g`` (flat block ``i = g n + j``) attends the ``S`` rows from flat row ``i P``
    on (:func:`_windows`)."""
    T, d = k.shape[2:]
    n = -(-T // block)
    after = 0 if causal else window
    kp = pad_rows(k, n * block, window, after, scale=1.0 / math.sqrt(d))
    vp = pad_rows(v, n * block, window, after)
    return kp, vp, n, block + window + after


def _blank_neighbours(x: Tensor, n: int, P: int, window: int, causal: bool, value: float
                      ) -> Tensor:
    """Overwrite, in place, the entries of ``x (..., n, rows, S)`` (blocks ``j`` of one
    sequence against their windows of the flat layout) that pair a block with another
    sequence's rows: the ``w - j P`` keys before the sequence (causal and bidirectional) and
    those past its ``n P`` rows (bidirectional). The mask excludes them anyway, but a product
    with them can overflow (float16 at 65504, with finite inputs) and ``inf - inf`` would
    reach this sequence as NaN; overwritten, they are exactly ``value``. Only the ``w / P``
    blocks at each end are touched, whatever ``T``."""
    edge = window // P
    for j in range(min(n, edge)):
        x[..., j, :, :window - j * P] = value
    if not causal:
        for j in range(max(0, n - edge), n):
            x[..., j, :, (n - j) * P + window:] = value
    return x


def _windows(flat: Tensor, first: int, count: int, block: int, n_keys: int) -> Tensor:
    """Windows ``first .. first + count`` of ``n_keys`` rows of ``flat (rows, d)``, window ``i``
    the rows ``[i P, i P + S)``: ``(count, S, d)``, a view (overlapping)."""
    d = flat.shape[1]
    return flat.as_strided((count, n_keys, d), (block * d, d, 1),
                           flat.storage_offset() + first * block * d)


class _WindowAttention(torch.autograd.Function):
    """Dense local attention on blocks of ``P`` queries (``P`` divides ``w``) against windows of
    ``S = m P = P + w`` keys (``P + 2w`` bidirectional), with its own backward.

    The keys and values of every ``(batch, head)`` sequence are padded once into one flat
    block of rows, back to back, so that the windows of all blocks of all sequences are one
    overlapping strided *view* with a single batch stride: the products run on it with no
    per-window copies (a view per sequence would not merge its batch dimensions, and
    ``matmul`` would copy every window). The work runs in tiles of whole sequences of about
    :data:`SCORE_TILE` score entries, small enough to stay in cache. The backward folds the
    window gradients back onto the keys with ``m`` shifted adds (no scatter): autograd through
    the strided views would instead materialise and scatter every window.

    The windows of a sequence's first ``w / P`` blocks (and last, bidirectional) reach up to
    ``w`` rows of the neighbouring sequences (of several, when a sequence is shorter than
    ``w``). Those entries are overwritten before the mask is added
    (:func:`_blank_neighbours`), so finite inputs never mix, even where a product with them
    overflows in float16 (tested). A NaN or an infinity in a neighbour's rows would still
    reach those blocks, through ``0 * x`` in the products with the values. The value checks
    (:mod:`bayes_router.core.validation`, on by default) refuse non-finite q, k, v at the
    expert's boundary; inside :class:`~bayes_router.models.router.RoutedAttention` they check
    the layer's input ``x`` once instead.
    """

    @staticmethod
    def _layout(q, k, v, window, causal, block):
        """The query blocks ``(G n, P, d)``, the keys (scaled by ``1 / sqrt(d)``) and values as
        flat padded rows ``(w + G n P (+ w), d)``, with the sizes ``(B, H, T, d, P, m, n)``.
        The queries are a view of ``q`` where ``T`` is a multiple of ``P`` and ``q`` is
        contiguous (the scale rides on the keys' copy, needed anyway). Block ``j`` of
        sequence ``g`` (flat block ``i = g n + j``) attends the window of ``S = m P`` rows
        from flat row ``i P`` on, the ``w`` keys before it (and ``w`` after it,
        bidirectional), ``P`` dividing ``w``. Consecutive windows are one stride apart across
        sequences too, so every product runs on views (no window is copied); the keys of a
        neighbouring sequence a window reaches are masked out."""
        B, H, T, d = q.shape
        P = block
        kp, vp, n, S = _flat_keys(k, v, window, causal, block)
        qb = pad_rows(q, n * P).view(B * H * n, P, d)
        m = S // P
        return qb, kp, vp, (B, H, T, d, P, m, n)

    @staticmethod
    def forward(ctx, q, k, v, window, causal, block):
        # q, k, v arrive in the compute dtype: autocast off, so that every product here, and
        # the out= buffers, keep it (CUDA's autocast would return the softmax in float32)
        with torch.autocast(q.device.type, enabled=False):
            return _WindowAttention._forward(ctx, q, k, v, window, causal, block)

    @staticmethod
    def _forward(ctx, q, k, v, window, causal, block):
        qb, kp, vp, (B, H, T, d, P, m, n) = _WindowAttention._layout(q, k, v, window, causal,
                                                                      block)
        S, N = m * P, B * H * n  # window length, blocks in all
        mask = _local_block_mask(n, P, S, T, window, causal, q.dtype, q.device)
        out = q.new_empty(N, P, d)
        save = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        probs = q.new_empty(N, P, S) if save else None
        tile = n * max(1, SCORE_TILE // (n * P * S))  # whole sequences of blocks
        for a in range(0, N, tile):
            b = min(N, a + tile)
            scores = torch.matmul(qb[a:b], _windows(kp, a, b - a, P, S).transpose(-1, -2))
            scores = scores.view(-1, n, P, S)
            _blank_neighbours(scores, n, P, window, causal, -math.inf).add_(mask)
            scores = scores.view(b - a, P, S)
            p = torch.softmax(scores, -1, out=probs[a:b]) if save else scores.softmax(-1)
            torch.matmul(p, _windows(vp, a, b - a, P, S), out=out[a:b])
        if save:  # the inputs, not their padded copies: the layer's other experts keep them
            ctx.save_for_backward(q, k, v, probs)
        ctx.window, ctx.causal, ctx.block = window, causal, block
        return out.view(B, H, n * P, d)[:, :, :T]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        # autocast off here too: a backward run under autocast must keep the saved dtype
        with torch.autocast(grad_out.device.type, enabled=False):
            return _WindowAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype)
        w = ctx.window
        qb, kp, vp, (B, H, T, d, P, m, n) = _WindowAttention._layout(q, k, v, w, ctx.causal,
                                                                      ctx.block)
        S, N, scale = m * P, B * H * n, 1.0 / math.sqrt(d)
        go = pad_rows(grad_out, n * P).view(N, P, d)
        dq = q.new_empty(N, P, d)
        dk_blocks = qb.new_zeros(N + m - 1, P, d)  # the flat padded rows, in blocks of P
        dv_blocks = qb.new_zeros(N + m - 1, P, d)
        tile = n * max(1, SCORE_TILE // (n * P * S))
        for a in range(0, N, tile):
            b = min(N, a + tile)
            kw, vw, p = _windows(kp, a, b - a, P, S), _windows(vp, a, b - a, P, S), probs[a:b]
            dp = torch.matmul(go[a:b], vw.transpose(-1, -2))  # (t, P, S)
            _blank_neighbours(dp.view(-1, n, P, S), n, P, w, ctx.causal, 0.0)  # p = 0 there
            ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p)  # in place: dp is fresh
            torch.matmul(ds, kw, out=dq[a:b])  # the keys are scaled: so is dq
            dkw = torch.matmul(ds.transpose(-1, -2), qb[a:b])  # (t, S, d), scaled below
            dvw = torch.matmul(p.transpose(-1, -2), go[a:b])
            for r in range(m):  # window i's part r is flat block i + r
                dk_blocks[a + r:b + r] += dkw[:, r * P:(r + 1) * P]
                dv_blocks[a + r:b + r] += dvw[:, r * P:(r + 1) * P]
        dq = dq.view(B, H, n * P, d)[:, :, :T]
        dk = dk_blocks.mul_(scale).view(-1, d)[w:w + N * P].view(B, H, n * P, d)[:, :, :T]
        dv = dv_blocks.view(-1, d)[w:w + N * P].view(B, H, n * P, d)[:, :, :T]
        return dq, dk, dv, None, None, None


class LocalAttention(AttentionExpert):
    """Softmax attention over the window ``[t - w, t]`` (causal) or ``[t - w, t + w]``.

    Blocked: queries in blocks of ``w`` rows (``w / 2`` for an even ``w >= 64``) attend the keys
    of their own and neighbouring blocks, so memory and time grow linearly in ``T``; no dense
    ``T x T`` band is ever built.

    :param window: look-back ``w``.
    """

    name = "local"

    def __init__(self, window: int = 32, causal: bool = True):
        super().__init__(causal=causal)
        self.window = check_int("window", window)

    @classmethod
    def from_config(cls, cfg) -> LocalAttention:
        return cls(window=cfg.window, causal=cfg.causal)

    def forward(self, q, k, v, positions=None):
        if q.shape[2] == 0:  # an empty sequence (and no rows): nothing to attend
            return (q + k + v)[:, :, :0]
        if positions is None:
            return _WindowAttention.apply(q, k, v, self.window, self.causal,
                                          self.block_size())
        return self._rows(q, k, v, positions)

    def block_size(self) -> int:
        """Queries per block of the dense kernel, ``P``: ``w / 2`` for an even ``w >= 64``,
        else ``w``. A block scores ``P + w`` keys per query (``P + 2w`` bidirectional), so
        halving it halves the wasted keys per query and scores a quarter fewer keys (a sixth,
        bidirectional), where the blocks stay large enough for efficient products (faster at
        ``w = 64``, slower forward+backward at ``w = 16, 32``; measured in ``docs/experts.md``
        and ``docs/notes/history.md``)."""
        w = self.window
        return w // 2 if w >= HALF_BLOCKS_FROM and w % 2 == 0 else w

    def _rows(self, q, k, v, positions):
        """Only the query rows at ``positions``: grouped by block into an ``(n, M)`` layout,
        each block against its window of the flat padded keys (a view, as in the dense
        kernel); the dense kernel's rows where blocks are more than :data:`DENSE_ROWS_FROM`
        full."""
        w = self.window
        B, H, T, d = q.shape
        P = self.block_size()
        n_blocks = -(-T // P)
        slot, source, M = block_layout(positions, P, n_blocks, T)  # a padded (n, M) layout
        if M > DENSE_ROWS_FROM * P:  # the dense kernel and a gather are faster
            return gather_rows(_WindowAttention.apply(q, k, v, w, self.causal, P), positions)
        kp, vp, _, S = _flat_keys(k, v, w, self.causal, P)
        N = B * H * n_blocks
        keys = _windows(kp, 0, N, P, S).view(B, H, n_blocks, S, d)
        values = _windows(vp, 0, N, P, S).view(B, H, n_blocks, S, d)
        qb = gather_rows(q, source).view(B, H, n_blocks, M, d)
        key_pos = _block_key_positions(n_blocks, P, S, w, q.device)  # (n, 1, S)
        valid = _window_valid(key_pos, source.view(B, n_blocks, M, 1), T, w, self.causal)
        mask = additive_mask(valid, q.dtype)[:, None]  # (B, 1, n, M, S)
        scores = torch.matmul(qb, keys.transpose(-2, -1))  # the keys are scaled
        _blank_neighbours(scores, n_blocks, P, w, self.causal, -math.inf)
        out = torch.matmul(scores.add_(mask).softmax(-1), values)  # (B, H, n, M, d)
        return gather_rows(out.reshape(B, H, -1, d), slot)

    def write_state(self, state, k, v, lengths=None, capacity=None):
        """Append ``k, v`` to a :class:`WindowCache` (a new one for ``state=None``; its size
        is ``w + 1`` whatever ``capacity``)."""
        counts = valid_counts(lengths, k.shape[0], k.shape[2], k.device)
        self._check_decoding()
        if state is None:
            B, H, _, d = k.shape
            state = WindowCache(torch.zeros(B, dtype=torch.long, device=k.device),
                                k.new_zeros(B, H, self.window + 1, d),
                                k.new_zeros(B, H, self.window + 1, d))
        state.write(k, v, counts)
        return state

    def decode(self, state: WindowCache, q, k, v, rows=None):
        """One token: append it, then attend each query to the ``min(t, w) + 1`` keys of its
        ring. ``T > 1``: the ring's last ``w`` keys before the new ones, then the new tokens
        through the blocked kernel, then append."""
        T = k.shape[2]
        if T == 1:
            state.write(k, v)
            keys, values, lengths = state.keys, state.values, state.lengths
            if rows is not None:
                keys, values, lengths = keys[rows], values[rows], lengths[rows]
            common = state.common_length()
            if common is not None and common >= state.slots:  # every slot holds a key
                return F.scaled_dot_product_attention(q, keys, values)
            valid = torch.arange(state.slots, device=q.device) < lengths[:, None]  # (R, S)
            return F.scaled_dot_product_attention(q, keys, values,
                                                  attn_mask=valid[:, None, None, :])
        if state.common_length() is None:
            raise ValueError("local expert: continuing sequences by more than one token at a "
                             "time needs sequences of one length (decode one token at a time)")
        if not q.shape[0]:  # no sequence reads: only the write
            state.write(k, v)
            return q
        before = min(int(state.lengths[0]), self.window)
        keys, values = state.in_order(before)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        if rows is not None:
            keys, values = keys[rows], values[rows]
        queries = torch.cat([q.new_zeros(*q.shape[:2], before, q.shape[3]), q], 2)
        last = torch.arange(before, before + T, device=q.device).expand(q.shape[0], T)
        out = self(queries, keys, values, last)
        state.write(k, v)
        return out

    def flops_per_token(self, seq_len, d_model, n_heads):
        # useful: the keys in [t - w, t] (causal) or [t - w, t + w] inside the sequence,
        # averaged over t (closed forms of sum_t min(t + 1, w + 1) and its two-sided twin)
        T, w = seq_len, min(self.window, seq_len - 1)
        before = (w * (w + 1) / 2 + (T - w) * (w + 1)) / T  # mean of min(t, w) + 1
        keys = before if self.causal else 2 * before - 1
        return 4.0 * d_model * keys

    def decode_flops(self, context, d_model, n_heads):
        # a query reads its ring: the min(t, w) + 1 keys of [t - w, t]
        return {"read": 4.0 * d_model * (min(context, self.window) + 1), "write": 0.0}

    def executed_flops_per_token(self, seq_len, d_model, n_heads, batch=1):
        # the blocked kernel scores P + w (causal) or P + 2w keys per query row, P the block
        keys = self.block_size() + (1 if self.causal else 2) * self.window
        return 4.0 * d_model * keys

    def naive(self, q, k, v):
        return naive_local(q, k, v, window=self.window, causal=self.causal)

    def softmax_keys(self, seq_len, device=None):
        positions = torch.arange(seq_len, device=device)
        return _window_valid(positions, positions[:, None], seq_len, self.window, self.causal)

    def extra_repr(self) -> str:
        return f"window={self.window}, causal={self.causal}"
