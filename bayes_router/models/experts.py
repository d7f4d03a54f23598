"""Attention experts, their naive reference twins, the expert registry and the FLOP cost model.

An expert *mixes* projected heads: ``expert(q, k, v) -> o`` with ``q, k, v`` of shape
``(B, H, T, d)``. Given ``positions`` of shape ``(B, R)`` it computes outputs only for those query
rows (keys and values stay whole) and returns ``(B, H, R, d)``: this is how hard routing saves real
compute. The q/k/v/out projections live in :class:`~bayes_router.models.router.RoutedAttention`
(shared across the experts of a layer, or one set per expert).

Every fast expert has a naive twin (``naive_full``, ``naive_linear``, ``naive_local``) built from a
dense masked softmax or explicit cumulative sums; the tests compare outputs and gradients.

FLOP model: FLOPs per query token (multiply-add = 2 FLOPs) of the attention *core* as our kernels
execute it (score and value products; feature maps and softmax are lower order and left out), plus
optionally the q/k/v/out projections ``8 D^2``. See ``docs/experts.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROW_TILE = 128  # query rows per tile when computing gathered rows (bounds memory and waste)


def _gather_rows(x: Tensor, positions: Tensor) -> Tensor:
    """``x (B, H, T, d)``, ``positions (B, R)`` -> ``(B, H, R, d)``.

    One ``index_select`` of whole ``d``-rows of the flattened ``(B H T, d)`` view: ``Tensor.gather``
    with an index expanded over ``d`` reads an int64 index per element and is several times slower.
    """
    B, H, T, d = x.shape
    flat_index = torch.arange(B * H, device=x.device).view(B, H, 1) * T + positions[:, None, :]
    return x.reshape(B * H * T, d).index_select(0, flat_index.reshape(-1)).view(B, H, -1, d)


def _row_tiles(positions: Tensor):
    """Split gathered rows into tiles of ``ROW_TILE`` (a loop over tiles, never over positions)."""
    for start in range(0, positions.shape[1], ROW_TILE):
        yield positions[:, start:start + ROW_TILE]


def _block_layout(positions: Tensor, block: int, n_blocks: int, seq_len: int
                  ) -> tuple[Tensor, Tensor, int]:
    """Group ascending query rows by the block of ``block`` positions they fall in.

    Blocked kernels then run on ``(n_blocks, M)`` query slots, ``M`` the most distinct rows in
    any block, with the same batched matmuls as the dense path, instead of gathering per-row
    windows or states. Repeated positions (the padding of
    :func:`~bayes_router.models.router.selected_positions`) share one slot, so padding never
    widens the layout.

    :param positions: ``(B, R)`` non-decreasing positions (padding may repeat the last one).
    :returns: ``slot (B, R)``, each row's index in the ``n_blocks * M`` slots; ``source
        (B, n_blocks * M)``, the position each slot computes (an empty slot computes its block's
        first position: a valid query whose output is never read); and ``M``.
    """
    B, R = positions.shape
    block_of = positions // block  # (B, R), non-decreasing
    is_new = torch.ones_like(positions, dtype=torch.bool)
    is_new[:, 1:] = positions[:, 1:] != positions[:, :-1]
    distinct = is_new.long().cumsum(1) - 1  # index among the row's distinct positions
    first_of_block = torch.searchsorted(block_of, block_of)  # (B, R) first entry of its block
    rank = distinct - distinct.gather(1, first_of_block)
    M = int(rank.max()) + 1
    slot = block_of * M + rank  # (B, R)
    source = torch.arange(n_blocks * M, device=positions.device) // M * block
    source = source.clamp(max=seq_len - 1).expand(B, -1).clone().scatter_(1, slot, positions)
    return slot, source, M


def _additive_mask(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean ``valid`` -> ``0`` where true, ``-inf`` where false."""
    mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~valid, -math.inf)


@functools.lru_cache(maxsize=16)
def _local_block_mask(n_blocks: int, block: int, n_keys: int, seq_len: int, window: int,
                      causal: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive mask ``(n_blocks, block, n_keys)`` of the dense blocked local kernel (cached: it
    depends only on the shapes; callers must not modify it)."""
    block_start = torch.arange(n_blocks, device=device)[:, None, None] * block
    query_pos = block_start + torch.arange(block, device=device)[:, None]  # (n, P, 1)
    key_pos = block_start - block + torch.arange(n_keys, device=device)  # (n, 1, S)
    offset = key_pos - query_pos
    valid = (key_pos >= 0) & (key_pos < seq_len) & (offset >= -window)
    valid = valid & (offset <= 0) if causal else valid & (offset <= window)
    return _additive_mask(valid, dtype)


def _masked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """``q (..., M, d)`` against ``k, v (..., S, d)`` with an additive ``mask (..., M, S)``.

    Explicit matmuls: on CPU, at the block shapes of the local expert, ~1.3x faster than
    ``F.scaled_dot_product_attention`` with a boolean ``attn_mask``.
    """
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1)) + mask
    return torch.matmul(scores.softmax(-1), v)


def elu_feature_map(x: Tensor) -> Tensor:
    """The linear expert's positive feature map ``elu(x) + 1`` (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1.0


class AttentionExpert(nn.Module):
    """Base class: a parameter-free mixer ``(q, k, v[, positions]) -> o``.

    Subclasses set :attr:`name` and implement :meth:`forward` and :meth:`flops_per_token`.
    """

    name: str = ""

    def __init__(self, window: int = 32, chunk_size: int = 64, causal: bool = True):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.window = window
        self.chunk_size = chunk_size
        self.causal = causal

    def forward(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def flops_per_token(self, seq_len: int, d_model: int, n_heads: int) -> float:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"causal={self.causal}"


class FullAttention(AttentionExpert):
    """Softmax attention over all (causal: all earlier) positions, O(T^2 D)."""

    name = "full"

    def forward(self, q, k, v, positions=None):
        if positions is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        if not self.causal:
            return F.scaled_dot_product_attention(_gather_rows(q, positions), k, v)
        outputs = []
        for rows in _row_tiles(positions):
            n_keys = int(rows.max()) + 1  # later keys are masked for every row of the tile
            valid = torch.arange(n_keys, device=q.device) <= rows[:, :, None]  # (B, R, S)
            outputs.append(F.scaled_dot_product_attention(
                _gather_rows(q, rows), k[:, :, :n_keys], v[:, :, :n_keys], attn_mask=valid[:, None]
            ))
        return torch.cat(outputs, dim=2)

    def flops_per_token(self, seq_len, d_model, n_heads):
        keys = (seq_len + 1) / 2 if self.causal else seq_len
        return 4.0 * d_model * keys


class LinearAttention(AttentionExpert):
    """Kernel attention with ``elu + 1`` features; causal form by chunked prefix sums, O(T D^2 / H).

    Within a chunk of ``chunk_size`` positions the causal part is a masked quadratic product;
    across chunks it is an exclusive prefix sum of the chunk states ``sum_s phi(k_s) v_s^T``.
    """

    name = "linear"
    eps = 1e-6

    def forward(self, q, k, v, positions=None):
        phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
        if not self.causal:
            state = phi_k.transpose(-2, -1) @ v  # (B, H, d, d)
            normaliser = phi_k.sum(-2)  # (B, H, d)
            if positions is not None:
                phi_q = _gather_rows(phi_q, positions)
            return (phi_q @ state) / ((phi_q * normaliser[:, :, None]).sum(-1, keepdim=True)
                                      + self.eps)
        B, H, T, d = q.shape
        C = self.chunk_size
        n_chunks = -(-T // C)
        pad = n_chunks * C - T
        phi_k = F.pad(phi_k, (0, 0, 0, pad)).view(B, H, n_chunks, C, d)  # zero features past T
        v_chunks = F.pad(v, (0, 0, 0, pad)).view(B, H, n_chunks, C, d)
        chunk_state = phi_k.transpose(-2, -1) @ v_chunks  # (B, H, n, d, d)
        chunk_norm = phi_k.sum(-2)  # (B, H, n, d)
        # exclusive prefix sums: the state of all chunks before chunk j
        prior_state = F.pad(chunk_state.cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
        prior_norm = F.pad(chunk_norm.cumsum(2)[:, :, :-1], (0, 0, 1, 0))
        if positions is None:
            phi_q = F.pad(phi_q, (0, 0, 0, pad)).view(B, H, n_chunks, C, d)
            causal_mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
            scores = (phi_q @ phi_k.transpose(-2, -1)).masked_fill(~causal_mask, 0.0)  # (B,H,n,C,C)
            numerator = scores @ v_chunks + phi_q @ prior_state
            denominator = scores.sum(-1) + (phi_q * prior_norm[:, :, :, None]).sum(-1)
            out = numerator / (denominator[..., None] + self.eps)
            return out.reshape(B, H, n_chunks * C, d)[:, :, :T]
        slot, source, M = _block_layout(positions, C, n_chunks, T)
        phi_q = _gather_rows(phi_q, source).view(B, H, n_chunks, M, d)  # rows grouped by chunk
        key_pos = torch.arange(n_chunks * C, device=q.device).view(n_chunks, 1, C)
        causal = (key_pos <= source.view(B, n_chunks, M, 1)).to(q.dtype)[:, None]  # (B,1,n,M,C)
        scores = (phi_q @ phi_k.transpose(-2, -1)) * causal  # (B, H, n, M, C)
        numerator = scores @ v_chunks + phi_q @ prior_state
        denominator = scores.sum(-1) + (phi_q * prior_norm[:, :, :, None]).sum(-1)
        out = numerator / (denominator[..., None] + self.eps)  # (B, H, n, M, d)
        return _gather_rows(out.reshape(B, H, n_chunks * M, d), slot)

    def flops_per_token(self, seq_len, d_model, n_heads):
        # chunk state and readout, 2 x 2 D d (d = D / H); the intra-chunk block is computed
        # whole and then masked: C keys for the scores and C for the values, 4 D C
        head_dim = d_model // n_heads
        if not self.causal:
            return 4.0 * d_model * head_dim
        C = min(self.chunk_size, seq_len)
        return 4.0 * d_model * head_dim + 4.0 * d_model * C


class LocalAttention(AttentionExpert):
    """Softmax attention over the window ``[t - w, t]`` (causal) or ``[t - w, t + w]``, O(T w D).

    Blocked: queries in blocks of ``w`` rows attend the keys of their own and neighbouring blocks,
    so memory and time grow linearly in ``T``; no dense ``T x T`` band is ever built.
    """

    name = "local"

    def forward(self, q, k, v, positions=None):
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
        if positions is None:
            qb = F.pad(q, (0, 0, 0, pad)).view(B, H, n_blocks, P, d)
            mask = _local_block_mask(n_blocks, P, keys.shape[3], T, w, self.causal, q.dtype,
                                     q.device)  # (n, P, S)
        else:  # the rows of each block in a padded (n, M) layout
            slot, source, M = _block_layout(positions, P, n_blocks, T)
            qb = _gather_rows(q, source).view(B, H, n_blocks, M, d)
            key_pos = (torch.arange(n_blocks, device=q.device)[:, None, None] * P - P
                       + torch.arange(keys.shape[3], device=q.device))  # (n, 1, S)
            offset = key_pos - source.view(B, n_blocks, M, 1)
            valid = (key_pos >= 0) & (key_pos < T) & (offset >= -w)
            valid = valid & (offset <= 0) if self.causal else valid & (offset <= w)
            mask = _additive_mask(valid, q.dtype)[:, None]  # (B, 1, n, M, S)
        out = _masked_softmax_attention(qb, keys, values, mask)  # (B, H, n, M, d)
        if positions is None:
            return out.reshape(B, H, n_blocks * P, d)[:, :, :T]
        return _gather_rows(out.reshape(B, H, -1, d), slot)

    def flops_per_token(self, seq_len, d_model, n_heads):
        # the blocked kernel evaluates 2w (causal) or 3w keys per query, never more than T
        keys = min(2 * self.window if self.causal else 3 * self.window, seq_len)
        return 4.0 * d_model * keys


# ----------------------------------------------------------------------------------------------
# naive twins: dense masks and explicit cumulative sums, obviously correct and slow


def naive_full(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    T = q.shape[2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    if causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


def naive_local(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool = True) -> Tensor:
    T = q.shape[2]
    offset = torch.arange(T)[None, :] - torch.arange(T)[:, None]  # key - query
    band = (offset >= -window) & (offset <= (0 if causal else window))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~band, float("-inf")).softmax(-1) @ v


def naive_linear(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, eps: float = 1e-6) -> Tensor:
    phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
    outer = phi_k[..., :, None] * v[..., None, :]  # (B, H, T, d, d): phi(k_s) v_s^T
    if causal:
        state, normaliser = outer.cumsum(2), phi_k.cumsum(2)
    else:
        state = outer.sum(2, keepdim=True).expand_as(outer)
        normaliser = phi_k.sum(2, keepdim=True).expand_as(phi_k)
    numerator = torch.einsum("bhtd,bhtde->bhte", phi_q, state)
    denominator = (phi_q * normaliser).sum(-1, keepdim=True)
    return numerator / (denominator + eps)


NAIVE_TWINS: dict[str, Callable[..., Tensor]] = {
    "full": lambda q, k, v, e: naive_full(q, k, v, causal=e.causal),
    "linear": lambda q, k, v, e: naive_linear(q, k, v, causal=e.causal),
    "local": lambda q, k, v, e: naive_local(q, k, v, window=e.window, causal=e.causal),
}


# ----------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class ExpertSpec:
    """A registered expert: its class and, optionally, a fixed relative cost."""

    name: str
    cls: type[AttentionExpert]
    fixed_cost: float | None = None


_REGISTRY: dict[str, ExpertSpec] = {}


def register_expert(name: str, cls: type[AttentionExpert], fixed_cost: float | None = None,
                    overwrite: bool = False) -> None:
    """Register an expert class under ``name``.

    The class must subclass :class:`AttentionExpert` and implement
    ``forward(q, k, v, positions)`` and ``flops_per_token(seq_len, d_model, n_heads)``;
    alternatively give ``fixed_cost`` (relative to ``full = 1``), which the cost vector uses as is.
    """
    if not isinstance(cls, type) or not issubclass(cls, AttentionExpert):
        raise TypeError(f"cls must subclass AttentionExpert, got {cls!r}")
    if fixed_cost is not None and not fixed_cost > 0:
        raise ValueError(f"fixed_cost must be > 0, got {fixed_cost}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"expert {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = ExpertSpec(name, cls, fixed_cost)


def unregister_expert(name: str) -> None:
    _REGISTRY.pop(name, None)


def expert_names() -> list[str]:
    return list(_REGISTRY)


def expert_spec(name: str) -> ExpertSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown expert {name!r}; registered experts are {expert_names()}")
    return _REGISTRY[name]


def build_expert(name: str, cfg) -> AttentionExpert:
    """Build the expert ``name`` from a :class:`~bayes_router.models.config.TinyLMConfig`."""
    return expert_spec(name).cls(window=cfg.window, chunk_size=cfg.chunk_size, causal=cfg.causal)


register_expert("full", FullAttention)
register_expert("linear", LinearAttention)
register_expert("local", LocalAttention)


# ----------------------------------------------------------------------------------------------
# FLOP cost model

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
