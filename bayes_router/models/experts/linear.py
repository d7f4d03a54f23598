"""``linear``: kernel attention with ``elu + 1`` features, O(T D^2 / H)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bayes_router.core.validation import check_int
from bayes_router.models.experts.base import (
    AttentionExpert,
    ExpertState,
    block_layout,
    gather_rows,
    pad_rows,
    valid_counts,
)
from bayes_router.models.experts.naive import elu_feature_map, naive_linear


@dataclass
class LinearState(ExpertState):
    """The running sums of every sequence, ``state = sum_s phi(k_s) [v_s, 1]^T`` ``(B, H, d,
    d + 1)``: the numerator's ``d x d`` state and, in its last column, the normaliser ``z =
    sum_s phi(k_s)``. Constant memory.

    The sums are kept in at least float32 (:func:`accumulator_dtype`) and written with
    autocast off: over thousands of tokens a bfloat16 sum (8 bits of mantissa) would drift
    by its own rounding at every step, while each read may still run in the compute dtype."""

    state: Tensor

    def write(self, k: Tensor, v: Tensor, counts: Tensor | None = None) -> None:
        """Add ``phi(k_s) [v_s, 1]^T`` of the first ``counts[b]`` of the ``T`` new tokens (all
        by default)."""
        with torch.autocast(k.device.type, enabled=False):
            self._write(k.to(self.state.dtype), v.to(self.state.dtype), counts)

    def _write(self, k: Tensor, v: Tensor, counts: Tensor | None) -> None:
        B, H, T, d = k.shape
        if counts is None and T > 1:  # a prompt: phi(k)^T v = elu(k)^T v + 1 (sum_s v_s)^T,
            # and the same for z, saving the passes of the + 1 and of [v, 1] over T rows
            elu_k = F.elu(k)
            self.state[..., :d].add_(elu_k.transpose(-1, -2) @ v).add_(v.sum(2)[:, :, None])
            self.state[..., d].add_(elu_k.sum(2)).add_(T)
            self.advance(T, counts)
            return
        phi_k = elu_feature_map(k)
        if counts is not None:  # right padding: its rows add nothing
            real = torch.arange(T, device=k.device) < counts[:, None]  # (B, T)
            phi_k = phi_k * real[:, None, :, None].to(phi_k.dtype)
        self.state.view(B * H, d, d + 1).baddbmm_(phi_k.reshape(B * H, T, d).transpose(1, 2),
                                                  _with_ones(v, T).view(B * H, T, d + 1))
        self.advance(T, counts)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the running sums for inputs of ``dtype``: float32, or ``dtype`` where it
    is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def _readout(phi_q: Tensor, scores: Tensor, v_chunks: Tensor, prior: Tensor, eps: float
             ) -> Tensor:
    """Outputs of queries ``phi_q (B, H, n, M, d)`` from their masked intra-chunk ``scores
    (B, H, n, M, C)``, the chunks' values with a ones column ``v_chunks (B, H, n, C, d + 1)``
    and the exclusive prefix ``prior (B, H, n, d, d + 1)`` of the chunks before theirs: one
    product gives numerator and normaliser together (the ones column sums the weights)."""
    out = scores @ v_chunks + phi_q @ prior
    d = out.shape[-1] - 1
    return out[..., :d] / (out[..., d:] + eps)


def _with_ones(v: Tensor, rows: int) -> Tensor:
    """``[v, 1]``, ``(B, H, rows, d + 1)``, zero rows after ``T``: the values with the ones
    column whose sums give the normaliser, written in one pass."""
    B, H, T, d = v.shape
    out = v.new_empty(B, H, rows, d + 1)
    out[:, :, :T, :d] = v
    out[:, :, :T, d] = 1
    out[:, :, T:] = 0
    return out


class _ChunkedLinear(torch.autograd.Function):
    """The causal chunked prefix sums of all rows, with their own backward.

    Forward, per chunk ``j`` of ``C`` positions (``G = B H`` sequences, ``n`` chunks, rows past
    ``T`` zero): ``S_j = phi(K_j)^T [V_j, 1]``; ``P_j = sum_{i<j} S_i``; ``A_j =
    tril(phi(Q_j) phi(K_j)^T)``; ``[num, den]_j = phi(Q_j) P_j + A_j [V_j, 1]``; ``o = num /
    (den + eps)``. It saves only the prefix states ``P``, the normaliser and its output; the
    feature maps, the ones-column values and the masked scores ``A`` are rebuilt from
    ``q, k, v`` in the backward (a pass each, one product for ``A``), where autograd kept all
    of them (13 MB a layer at B16 H4 T256 d32 C64), and the backward runs its products
    without autograd's pad, concatenation and mask copies. It is differentiable once (no
    double backward), like the local kernel.
    """

    @staticmethod
    def forward(ctx, q, k, v, chunk, eps):
        # q, k, v arrive in the compute dtype: autocast off, so that every product keeps it
        with torch.autocast(q.device.type, enabled=False):
            B, H, T, d = q.shape
            n = -(-T // chunk)
            pq, pk, vc = _ChunkedLinear._operands(q, k, v, chunk, n)
            state = pk.transpose(-1, -2) @ vc  # (G, n, d, d + 1)
            prior = torch.empty_like(state)
            prior[:, 0] = 0
            torch.cumsum(state[:, :-1], 1, out=prior[:, 1:])  # exclusive prefix sums
            scores = torch.matmul(pq, pk.transpose(-1, -2)).tril_()  # (G, n, C, C)
            out = torch.matmul(pq, prior)  # (G, n, C, d + 1), fresh
            out.view(-1, chunk, d + 1).baddbmm_(scores.view(-1, chunk, chunk),
                                                vc.view(-1, chunk, d + 1))
            den = out[..., d:] + eps
            o = out[..., :d] / den  # (G, n, C, d), contiguous
            if any(ctx.needs_input_grad[:3]):
                ctx.save_for_backward(q, k, v, prior, den, o)
            ctx.chunk = chunk
            return o.view(B, H, n * chunk, d)[:, :, :T]

    @staticmethod
    def _operands(q, k, v, chunk, n):
        """``phi(q)``, ``phi(k)`` and ``[v, 1]`` in chunks ``(G, n, C, .)``, zero past ``T``."""
        B, H, T, d = q.shape
        G, rows = B * H, n * chunk
        pq = pad_rows(elu_feature_map(q), rows).view(G, n, chunk, d)
        pk = pad_rows(elu_feature_map(k), rows).view(G, n, chunk, d)
        vc = _with_ones(v, rows).view(G, n, chunk, d + 1)
        return pq, pk, vc

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, prior, den, o = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            return _ChunkedLinear._backward(ctx.chunk, grad, q, k, v, prior, den, o) \
                + (None, None)

    @staticmethod
    def _backward(chunk, grad, q, k, v, prior, den, o):
        B, H, T, d = q.shape
        n = -(-T // chunk)
        pq, pk, vc = _ChunkedLinear._operands(q, k, v, chunk, n)
        # [num, den] -> o = num / den: d num = g / den, d den = -sum_d g o / den
        g = pad_rows(grad.to(o.dtype), n * chunk).view(B * H, n, chunk, d)
        g_out = g.new_empty(B * H, n, chunk, d + 1)
        torch.div(g, den, out=g_out[..., :d])
        torch.sum(g_out[..., :d] * o, -1, keepdim=True, out=g_out[..., d:]).neg_()
        g_scores = torch.matmul(g_out, vc.transpose(-1, -2)).tril_()  # (G, n, C, C)
        g_pq = torch.matmul(g_out, prior.transpose(-1, -2))  # (G, n, C, d)
        g_pq.view(-1, chunk, d).baddbmm_(g_scores.view(-1, chunk, chunk), pk.view(-1, chunk, d))
        g_prior = torch.matmul(pq.transpose(-1, -2), g_out)  # (G, n, d, d + 1)
        # prior_j = sum_{i<j} state_i, so d state_i = sum_{j>i} d prior_j
        g_state = torch.zeros_like(g_prior)
        g_state[:, :-1] = g_prior[:, 1:].flip(1).cumsum(1).flip(1)
        g_pk = torch.matmul(vc, g_state.transpose(-1, -2))  # state = phi(k)^T [v, 1]
        g_pk.view(-1, chunk, d).baddbmm_(g_scores.view(-1, chunk, chunk).transpose(-1, -2),
                                         pq.view(-1, chunk, d))  # a transposed view, no copy
        g_vc = torch.matmul(pk, g_state)
        # the forward's scores, transposed, rebuilt in the score gradient's buffer (done with)
        scores = torch.matmul(pk, pq.transpose(-1, -2), out=g_scores).triu_()
        g_vc.view(-1, chunk, d + 1).baddbmm_(scores.view(-1, chunk, chunk),
                                             g_out.view(-1, chunk, d + 1))
        # phi = elu + 1 has derivative min(phi, 1)
        g_q = g_pq.mul_(pq.clamp_(max=1)).view(B, H, n * chunk, d)[:, :, :T]
        g_k = g_pk.mul_(pk.clamp_(max=1)).view(B, H, n * chunk, d)[:, :, :T]
        g_v = g_vc.view(B, H, n * chunk, d + 1)[:, :, :T, :d]
        return g_q, g_k, g_v


#: Causal sequences of at most this many chunks run as one masked ``T x T`` product: fewer,
#: larger operations are faster there; at four chunks the prefix sums win
#: (``docs/experts.md`` has the measurements).
QUADRATIC_CHUNKS = 2

#: ... and only while its ``B H x T x T`` scores (rows x T where rows are selected) hold at most
#: this many entries (1 MB of float32): past it the passes over them cost more than the
#: prefix sums' extra products save (``docs/experts.md``, measured by
#: ``benchmarks/linear_quadratic_ab.py``). Gathered rows take the same limit on rows x T,
#: not timed separately.
QUADRATIC_SCORES = 1 << 18

#: Gathered causal rows come from the dense prefix sums and a gather when they are more than
#: this share of the sequence: the rows' chunk states are those of every position anyway,
#: and above it the rows path is slower than dense and gather (the crossover measured in
#: ``docs/experts.md``).
DENSE_ROWS_FROM = 0.6


class LinearAttention(AttentionExpert):
    """Kernel attention with ``elu + 1`` features; causal form by chunked prefix sums.

    Within a chunk of ``chunk_size`` positions the causal part is a masked quadratic product;
    across chunks it is an exclusive prefix sum of the chunk states ``sum_s phi(k_s) v_s^T``.

    :param chunk_size: chunk length ``C`` of the prefix sums.
    """

    name = "linear"
    eps = 1e-6

    def __init__(self, chunk_size: int = 64, causal: bool = True):
        super().__init__(causal=causal)
        self.chunk_size = check_int("chunk_size", chunk_size)

    @classmethod
    def from_config(cls, cfg) -> LinearAttention:
        return cls(chunk_size=cfg.chunk_size, causal=cfg.causal)

    def forward(self, q, k, v, positions=None):
        B, H, T, d = q.shape
        C = self.chunk_size
        rows = T if positions is None else positions.shape[1]
        quadratic = self.quadratic(T, B * H * rows)
        if self.causal and positions is None and not quadratic:
            return _ChunkedLinear.apply(q, k, v, C, self.eps)
        if self.causal and not quadratic and rows > DENSE_ROWS_FROM * T:  # most of the rows
            return gather_rows(_ChunkedLinear.apply(q, k, v, C, self.eps), positions)
        # the feature map of the queries only where they are read (a gather commutes with it)
        phi_k = elu_feature_map(k)
        if not self.causal:
            state = phi_k.transpose(-2, -1) @ v  # (B, H, d, d)
            normaliser = phi_k.sum(-2)  # (B, H, d)
            phi_q = elu_feature_map(q if positions is None else gather_rows(q, positions))
            return (phi_q @ state) / ((phi_q * normaliser[:, :, None]).sum(-1, keepdim=True)
                                      + self.eps)
        if quadratic:
            return self._quadratic(q, phi_k, v, positions)
        n_chunks = -(-T // C)
        phi_k = pad_rows(phi_k, n_chunks * C).view(B, H, n_chunks, C, d)  # zero past T
        v_chunks = _with_ones(v, n_chunks * C).view(B, H, n_chunks, C, d + 1)
        # per chunk sum_s phi(k_s) [v_s, 1]^T: the state and the normaliser in one product
        chunk_state = phi_k.transpose(-2, -1) @ v_chunks  # (B, H, n, d, d + 1)
        # exclusive prefix sums: the state of all chunks before chunk j
        prior = F.pad(chunk_state.cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
        slot, source, M = block_layout(positions, C, n_chunks, T)
        phi_q = elu_feature_map(gather_rows(q, source)).view(B, H, n_chunks, M, d)  # by chunk
        key_pos = torch.arange(n_chunks * C, device=q.device).view(n_chunks, 1, C)
        causal = (key_pos <= source.view(B, n_chunks, M, 1)).to(q.dtype)[:, None]  # (B,1,n,M,C)
        scores = (phi_q @ phi_k.transpose(-2, -1)) * causal  # (B, H, n, M, C)
        out = _readout(phi_q, scores, v_chunks, prior, self.eps)
        return gather_rows(out.reshape(B, H, n_chunks * M, d), slot)

    def write_state(self, state, k, v, lengths=None, capacity=None):
        """Add ``k, v`` to a :class:`LinearState` (a new one for ``state=None``)."""
        counts = valid_counts(lengths, k.shape[0], k.shape[2], k.device)
        self._check_decoding()
        if state is None:
            B, H, _, d = k.shape
            state = LinearState(torch.zeros(B, dtype=torch.long, device=k.device),
                                k.new_zeros(B, H, d, d + 1, dtype=accumulator_dtype(k.dtype)))
        state.write(k, v, counts)
        return state

    def decode(self, state: LinearState, q, k, v, rows=None):
        """One token: add it to the running sums, then read them, ``o = phi(q) S / (phi(q) z
        + eps)``. ``T > 1``: the sums before the new tokens plus their masked ``T x T``
        scores (the chunked kernel's readout), then add them."""
        T = k.shape[2]
        phi_q = elu_feature_map(q)
        if T == 1:
            state.write(k, v)
            prior, scores, values = state.state, None, None
            if rows is not None:
                prior = prior[rows]
            prior = prior.to(phi_q.dtype)  # read in the compute dtype, as autocast would
        else:
            phi_k, values = elu_feature_map(k), _with_ones(v, T)
            if rows is not None:
                phi_k, values = phi_k[rows], values[rows]
            scores = (phi_q @ phi_k.transpose(-1, -2)).tril_()  # (R, H, T, T)
            # the sums before the new tokens (a copy: the write below adds in place)
            prior = state.state.clone() if rows is None else state.state[rows]
            prior = prior.to(phi_q.dtype)  # read in the compute dtype, as autocast would
            state.write(k, v)
        out = phi_q @ prior if scores is None else torch.baddbmm(
            (phi_q @ prior).flatten(0, 1), scores.flatten(0, 1), values.flatten(0, 1)
        ).view(*q.shape[:3], q.shape[3] + 1)
        d = q.shape[-1]
        return out[..., :d] / (out[..., d:] + self.eps)

    def quadratic(self, seq_len: int, query_rows: int = 1) -> bool:
        """Whether a causal sequence of ``seq_len`` runs as one masked ``T x T`` product
        (:data:`QUADRATIC_CHUNKS` chunks or fewer, and the scores of all ``query_rows`` query
        rows, ``B H T`` for a whole batch, at most :data:`QUADRATIC_SCORES` entries) rather
        than the chunked prefix sums."""
        return (seq_len <= QUADRATIC_CHUNKS * self.chunk_size
                and query_rows * seq_len <= QUADRATIC_SCORES)

    def _quadratic(self, q: Tensor, phi_k: Tensor, v: Tensor, positions: Tensor | None
                   ) -> Tensor:
        """The causal form as one masked ``T x T`` product, for sequences of at most
        :data:`QUADRATIC_CHUNKS` chunks (fewer, larger operations than the prefix sums)."""
        T = phi_k.shape[2]
        key_pos = torch.arange(T, device=phi_k.device)
        if positions is None:
            phi_q = elu_feature_map(q)
            mask = (key_pos <= key_pos[:, None]).to(q.dtype)  # (T, T)
        else:
            phi_q = elu_feature_map(gather_rows(q, positions))
            mask = (key_pos <= positions[:, :, None]).to(q.dtype)[:, None]  # (B, 1, R, T)
        scores = (phi_q @ phi_k.transpose(-2, -1)) * mask
        return (scores @ v) / (scores.sum(-1, keepdim=True) + self.eps)

    def flops_per_token(self, seq_len, d_model, n_heads):
        # useful: the state update phi(k) v^T and the readout phi(q)^T S, 2 x 2 D d (d = D / H)
        return 4.0 * d_model * (d_model // n_heads)

    def decode_flops(self, context, d_model, n_heads):
        # read: phi(q)^T [S, z]; write: S += phi(k) [v, 1]^T; each 2 D (d + 1), whatever t
        d = d_model // n_heads
        return {"read": 2.0 * d_model * (d + 1), "write": 2.0 * d_model * (d + 1)}

    def executed_flops_per_token(self, seq_len, d_model, n_heads, batch=1):
        # the chunked kernel also scores every chunk whole, then masks it: C keys for the scores
        # and C for the values, 4 D C (causal only); the quadratic form scores all T keys
        useful = self.flops_per_token(seq_len, d_model, n_heads)
        if not self.causal:
            return useful
        if self.quadratic(seq_len, batch * n_heads * seq_len):  # every key scored, then masked
            return 4.0 * d_model * seq_len
        return useful + 4.0 * d_model * min(self.chunk_size, seq_len)

    def naive(self, q, k, v):
        return naive_linear(q, k, v, causal=self.causal, eps=self.eps)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, causal={self.causal}"
