"""``local``: softmax attention over a sliding window, O(T w D)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bayes_router.models.experts.base import (
    AttentionExpert,
    additive_mask,
    block_layout,
    check_positive_int,
    gather_rows,
)
from bayes_router.models.experts.naive import naive_local


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


def _masked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """``q (..., M, d)`` against ``k, v (..., S, d)`` with an additive ``mask (..., M, S)``.

    Explicit matmuls: on CPU, at the block shapes of the local expert, ~1.3x faster than
    ``F.scaled_dot_product_attention`` with a boolean ``attn_mask``.
    """
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1)) + mask
    return torch.matmul(scores.softmax(-1), v)


#: Score entries (query rows x window keys) per tile of the dense kernel: ~1 MB of float32,
#: so that scores, probabilities and their gradients stay in cache while a tile is processed.
SCORE_TILE = 1 << 18

#: The smallest window whose dense kernel runs blocks of ``w / 2`` queries (see
#: :meth:`LocalAttention.block_size`).
HALF_BLOCKS_FROM = 64


def _padded(x: Tensor, front: int, rows: int, scale: float | None = None) -> Tensor:
    """``x (B, H, T, d)`` copied (times ``scale``) into zero rows ``(B, H, rows, d)``, from row
    ``front`` on, contiguous: one pass over ``x``, zeros only in the padding (``F.pad`` zeroes
    the whole output first), whatever the memory format of ``x`` (the windows are strided views
    that assume contiguous rows)."""
    B, H, T, d = x.shape
    out = x.new_empty(B, H, rows, d)
    out[:, :, :front].zero_()
    out[:, :, front + T:].zero_()
    body = out[:, :, front:front + T]
    if scale is None:
        body.copy_(x)
    else:
        torch.mul(x, scale, out=body)
    return out


def _windows(padded: Tensor, n_blocks: int, block: int, n_keys: int) -> Tensor:
    """Overlapping key windows ``(G, n, S, d)`` of ``padded (G, rows, d)``, a view: window
    ``j`` holds rows ``[j P, j P + S)``."""
    G, _, d = padded.shape
    return padded.as_strided((G, n_blocks, n_keys, d),
                             (padded.stride(0), block * d, d, 1), padded.storage_offset())


class _WindowAttention(torch.autograd.Function):
    """Dense local attention on blocks of ``P`` queries (``P`` divides ``w``) against windows of
    ``S = m P = P + w`` keys (``P + 2w`` bidirectional), with its own backward.

    The key and value windows are overlapping *views* of the keys padded once (no per-window
    copies), and the work runs in tiles of whole ``(batch, head)`` rows of about
    :data:`SCORE_TILE` score entries, small enough to stay in cache. The backward folds the
    window gradients back onto the keys with ``m`` shifted adds (no scatter): autograd through
    the strided views would instead materialise and scatter every window.
    """

    @staticmethod
    def _layout(q, k, v, window, causal, block):
        """The scaled query blocks ``(G, n, P, d)`` and the padded keys and values
        ``(G, rows, d)``, with the sizes ``(B, H, T, d, P, m, n, rows)``: blocks of ``P``
        queries (``P`` divides ``w``) against windows of ``S = m P`` keys, ``w`` before the
        block (and ``w`` after it, bidirectional)."""
        B, H, T, d = q.shape
        P = block
        m = 1 + (1 if causal else 2) * (window // P)
        n = -(-T // P)
        rows = (n + m - 1) * P  # padded key rows: w in front (and w behind)
        G = B * H
        qb = _padded(q, 0, n * P, scale=1.0 / math.sqrt(d)).view(G, n, P, d)
        kp = _padded(k, window, rows).view(G, rows, d)
        vp = _padded(v, window, rows).view(G, rows, d)
        return qb, kp, vp, (B, H, T, d, P, m, n, rows)

    @staticmethod
    def forward(ctx, q, k, v, window, causal, block):
        # q, k, v arrive in the compute dtype: autocast off, so that every product here, and
        # the out= buffers, keep it (CUDA's autocast would return the softmax in float32)
        with torch.autocast(q.device.type, enabled=False):
            return _WindowAttention._forward(ctx, q, k, v, window, causal, block)

    @staticmethod
    def _forward(ctx, q, k, v, window, causal, block):
        qb, kp, vp, shape = _WindowAttention._layout(q, k, v, window, causal, block)
        B, H, T, d, P, m, n, rows = shape
        S, G = m * P, B * H
        mask = _local_block_mask(n, P, S, T, window, causal, q.dtype, q.device)
        out = q.new_empty(G, n, P, d)
        save = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        probs = q.new_empty(G, n, P, S) if save else None
        tile = max(1, SCORE_TILE // (n * P * S))
        for a in range(0, G, tile):
            b = min(G, a + tile)
            kw = _windows(kp[a:b], n, P, S)
            scores = torch.matmul(qb[a:b], kw.transpose(-1, -2)).add_(mask)
            p = torch.softmax(scores, -1)
            torch.matmul(p, _windows(vp[a:b], n, P, S), out=out[a:b])
            if save:
                probs[a:b] = p
        if save:  # the inputs, not their padded copies: the layer's other experts keep them
            ctx.save_for_backward(q, k, v, probs)
        ctx.window, ctx.causal, ctx.block = window, causal, block
        return out.view(B, H, n * P, d)[:, :, :T]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        qb, kp, vp, (B, H, T, d, P, m, n, rows) = _WindowAttention._layout(
            q, k, v, ctx.window, ctx.causal, ctx.block)
        G, S, scale = B * H, m * P, 1.0 / math.sqrt(d)
        go = F.pad(grad_out, (0, 0, 0, n * P - T)).reshape(G, n, P, d)
        dq = torch.empty_like(qb)
        dk_blocks = qb.new_zeros(G, n + m - 1, P, d)
        dv_blocks = qb.new_zeros(G, n + m - 1, P, d)
        tile = max(1, SCORE_TILE // (n * P * S))
        for a in range(0, G, tile):
            b = min(G, a + tile)
            kw, vw, p = _windows(kp[a:b], n, P, S), _windows(vp[a:b], n, P, S), probs[a:b]
            dp = torch.matmul(go[a:b], vw.transpose(-1, -2))  # (g, n, P, S)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True))
            torch.matmul(ds, kw, out=dq[a:b])
            dkw = torch.matmul(ds.transpose(-1, -2), qb[a:b])  # (g, n, S, d), q scaled
            dvw = torch.matmul(p.transpose(-1, -2), go[a:b])
            for r in range(m):  # window j's part r is padded block j + r
                dk_blocks[a:b, r:r + n] += dkw[:, :, r * P:(r + 1) * P]
                dv_blocks[a:b, r:r + n] += dvw[:, :, r * P:(r + 1) * P]
        dq = (dq * scale).view(B, H, n * P, d)[:, :, :T]
        w = ctx.window
        dk = dk_blocks.view(B, H, rows, d)[:, :, w:w + T]
        dv = dv_blocks.view(B, H, rows, d)[:, :, w:w + T]
        return dq, dk, dv, None, None, None


class LocalAttention(AttentionExpert):
    """Softmax attention over the window ``[t - w, t]`` (causal) or ``[t - w, t + w]``.

    Blocked: queries in blocks of ``w`` rows (``w / 2`` from ``w = 64``) attend the keys of their
    own and neighbouring blocks,
    so memory and time grow linearly in ``T``; no dense ``T x T`` band is ever built.

    :param window: look-back ``w``.
    """

    name = "local"

    def __init__(self, window: int = 32, causal: bool = True):
        super().__init__(causal=causal)
        self.window = check_positive_int("window", window)

    @classmethod
    def from_config(cls, cfg) -> LocalAttention:
        return cls(window=cfg.window, causal=cfg.causal)

    def forward(self, q, k, v, positions=None):
        if positions is None:
            return _WindowAttention.apply(q, k, v, self.window, self.causal,
                                          self.block_size())
        return self._rows(q, k, v, positions)

    def block_size(self) -> int:
        """Queries per block of the dense kernel, ``P``: ``w / 2`` for an even ``w >= 64``,
        else ``w``. A block scores ``P + w`` keys per query (``P + 2w`` bidirectional), so
        halving it cuts the wasted scores by a third where the blocks stay large enough for
        efficient products (``docs/experts.md``: 0.85x forward at ``w = 64``, ``d = 64``;
        slower forward+backward at ``w = 16, 32``)."""
        w = self.window
        return w // 2 if w >= HALF_BLOCKS_FROM and w % 2 == 0 else w

    def _rows(self, q, k, v, positions):
        """Only the query rows at ``positions``, in the padded per-block layout."""
        w = self.window
        B, H, T, d = q.shape
        P = w  # block size
        n_blocks = -(-T // P)
        pad = n_blocks * P - T
        kb = F.pad(k, (0, 0, 0, pad)).view(B, H, n_blocks, P, d)
        vb = F.pad(v, (0, 0, 0, pad)).view(B, H, n_blocks, P, d)
        previous = [F.pad(a, (0, 0, 0, 0, 1, 0))[:, :, :-1] for a in (kb, vb)]  # block j - 1
        if self.causal:
            keys = torch.cat([previous[0], kb], dim=3)  # (B, H, n, 2P, d)
            values = torch.cat([previous[1], vb], dim=3)
        else:
            following = [F.pad(a, (0, 0, 0, 0, 0, 1))[:, :, 1:] for a in (kb, vb)]  # block j + 1
            keys = torch.cat([previous[0], kb, following[0]], dim=3)  # (B, H, n, 3P, d)
            values = torch.cat([previous[1], vb, following[1]], dim=3)
        slot, source, M = block_layout(positions, P, n_blocks, T)  # a padded (n, M) layout
        qb = gather_rows(q, source).view(B, H, n_blocks, M, d)
        key_pos = _block_key_positions(n_blocks, P, keys.shape[3], P, q.device)  # (n, 1, S)
        valid = _window_valid(key_pos, source.view(B, n_blocks, M, 1), T, w, self.causal)
        mask = additive_mask(valid, q.dtype)[:, None]  # (B, 1, n, M, S)
        out = _masked_softmax_attention(qb, keys, values, mask)  # (B, H, n, M, d)
        return gather_rows(out.reshape(B, H, -1, d), slot)

    def flops_per_token(self, seq_len, d_model, n_heads):
        # useful: the keys in [t - w, t] (causal) or [t - w, t + w] inside the sequence,
        # averaged over t (closed forms of sum_t min(t + 1, w + 1) and its two-sided twin)
        T, w = seq_len, min(self.window, seq_len - 1)
        before = (w * (w + 1) / 2 + (T - w) * (w + 1)) / T  # mean of min(t, w) + 1
        keys = before if self.causal else 2 * before - 1
        return 4.0 * d_model * keys

    def executed_flops_per_token(self, seq_len, d_model, n_heads):
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
