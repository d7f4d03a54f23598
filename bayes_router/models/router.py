"""The routed attention layer and the routing contract between the LM and its router.

:class:`RoutedAttention` mixes the outputs of its experts with per-token weights ``(B, T, K)``.
With ``sparse=True`` an expert computes outputs only for the query rows whose weight for it is
non-zero (gather the rows, keep keys and values whole, scatter back): one-hot weights give hard
routing whose saving is real, and a mixture of one-hot and dense rows gives uncertainty-gated
routing, all through one code path.

Given a :class:`LayerCache`, the layer also decodes: the first call (a prompt, the *prefill*)
runs the same mixing and writes every expert's state from its keys and values in that pass;
later calls (one token, or a chunk) append to every expert's state and read, for each
sequence, only the experts it is routed to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from bayes_router.core.validation import all_finite, is_validation_enabled, validation_enabled
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.dense_mix import row_masks, shared_softmax, softmax_experts
from bayes_router.models.experts import build_expert
from bayes_router.models.experts.base import ExpertState
from bayes_router.models.rotary import apply_rotary, rotary_angles

ROUTING_MODES = ("soft", "hard", "gated")
#: Sequence lengths whose row masks a layer keeps (each ``K x T x T``, at most 0.8 MB at T=256).
ROW_MASK_CACHE = 8


@dataclass
class RoutingDecision:
    """What a router returns for one layer.

    :param weights: ``(..., T, K)`` routing weights used by soft routing (a posterior sample for
        the Bayesian router, the softmax for the prior-free one).
    :param mean: ``(..., T, K)`` expected weights, whose argmax drives hard routing.
    :param uncertainty: ``(..., T)`` routing uncertainty used by gated routing, if known.
    :param concentration: ``(..., T, K)`` Dirichlet concentration of the guide, if any.
    :param logits: ``(..., T, K)`` the controller's raw outputs.
    """

    weights: Tensor
    mean: Tensor
    uncertainty: Tensor | None = None
    concentration: Tensor | None = None
    logits: Tensor | None = None


class Router(Protocol):
    """Supplies routing weights: ``router(layer, features) -> RoutingDecision``."""

    def __call__(self, layer: int, features: Tensor) -> RoutingDecision: ...


@dataclass
class LayerRouting:
    """Intermediates of one routed layer, returned with the LM output for analysis code."""

    features: Tensor  # (..., T, F)
    decision: RoutingDecision
    applied_weights: Tensor  # (..., T, K) weights the layer actually used
    expert_index: Tensor | None  # (..., T) expert of each hard-routed token, else None
    hard_mask: Tensor | None  # (..., T) which tokens went hard (gated and hard modes)


@dataclass
class LayerCache:
    """The decoding state of one routed layer: one state per expert (``None`` until the
    prefill writes it), each with room for ``capacity`` positions where it keeps them all."""

    states: list[ExpertState | None]
    capacity: int
    heads: tuple[int, int] = (0, 0)  # (H, d) of the layer that made it

    @property
    def empty(self) -> bool:
        return self.states[0] is None

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states if s is not None)


def selected_positions(selected: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of the selected tokens of each row, ascending, padded to the longest row.

    :param selected: ``(B, T)`` boolean.
    :returns: ``positions (B, R)`` and ``valid (B, R)``; padding repeats the row's last selected
        position (or 0), so it is real work with zero weight.
    """
    counts = selected.sum(1)
    R = int(counts.max())
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :R]  # (B, R)
    valid = torch.arange(R, device=selected.device) < counts[:, None]
    last = order.gather(1, (counts - 1).clamp(min=0)[:, None])
    return torch.where(valid, order, last), valid


class RoutedAttention(nn.Module):
    """Per-token mixture of attention experts ``(..., T, D) x (..., T, K) -> (..., T, D)``.

    With ``cfg.shared_qkv`` the experts share one q/k/v and out projection (the outputs are mixed
    per head before the single out projection); otherwise every expert owns its projections.
    """

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleList(build_expert(name, cfg) for name in cfg.experts)
        D = cfg.d_model
        self._softmax_experts = softmax_experts(self.experts)
        self._row_masks: dict = {}  # (T, dtype, device) -> dense_mix.row_masks, the last few
        if cfg.shared_qkv:
            self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        else:
            self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in cfg.experts)
            self.out = nn.ModuleList(nn.Linear(D, D) for _ in cfg.experts)

    def _heads(self, qkv: Tensor, rotation: tuple[Tensor, Tensor] | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = qkv.shape
        H, d = self.cfg.n_heads, self.cfg.head_dim
        # one contiguous copy here saves every expert (and every row tile) its own copy
        q, k, v = qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).contiguous()  # 3 x (B, H, T, d)
        if rotation is not None:  # rotary positions: q and k rotated, v as it is
            q, k = apply_rotary(q, *rotation), apply_rotary(k, *rotation)
        return q, k, v

    def _rotation(self, x: Tensor, positions: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """``cos, sin`` of the tokens' rotary angles (``None`` with learned positions)."""
        if self.cfg.positions != "rotary":
            return None
        if positions is None:
            positions = torch.arange(x.shape[-2], device=x.device)
        return rotary_angles(positions, self.cfg.head_dim, x.dtype)

    def new_cache(self, capacity: int) -> LayerCache:
        """An empty :class:`LayerCache` for decoding up to ``capacity`` positions."""
        return LayerCache([None] * len(self.experts), capacity,
                          (self.cfg.n_heads, self.cfg.head_dim))

    def forward(self, x: Tensor, weights: Tensor, sparse: bool = False,
                cache: LayerCache | None = None, lengths: Tensor | None = None,
                positions: Tensor | None = None) -> Tensor:
        """Mix the experts with ``weights``; ``sparse`` skips the rows an expert has weight 0 on.

        :param cache: decode: an empty cache is filled from this pass (a prefill of ``x``,
            whose sequences hold ``lengths (B,)`` real tokens each, right-padded; all by
            default); a filled one is continued by ``x``. No leading particle dimensions.
        :param positions: ``(B, T)`` the tokens' positions, which rotary embeddings read
            (default ``0 .. T - 1``).
        """
        K, D = len(self.experts), self.cfg.d_model
        dtype = (self.out if self.cfg.shared_qkv else self.out[0]).weight.dtype
        for name, t, width in (("x", x, D), ("weights", weights, K)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() < 2:
                raise ValueError(f"{name} must be a floating tensor (..., T, {width}), got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} of shape "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        if x.shape[-1] != D:
            raise ValueError(f"x must have shape (..., T, D={D}), got {tuple(x.shape)}")
        if x.dtype != dtype:
            raise ValueError(f"x must have the layer's dtype {dtype}, got {x.dtype} (convert "
                             f"the input or the module with .to(dtype))")
        if weights.shape[-1] != K or weights.shape[-2] != x.shape[-2]:
            raise ValueError(f"weights must have shape (..., T={x.shape[-2]}, K={K}), "
                             f"got {tuple(weights.shape)}")
        if not all_finite(weights) or bool((weights < 0).any()):
            raise ValueError("weights must be finite and non-negative")
        if is_validation_enabled() and not all_finite(x):
            raise ValueError("x holds NaN or Inf")
        if cache is not None and (x.dim() != 3 or weights.dim() != 3):
            raise ValueError(f"decoding takes x (B, T, D) and weights (B, T, K) without "
                             f"leading dimensions, got {tuple(x.shape)} and "
                             f"{tuple(weights.shape)}")
        if cache is not None and (len(cache.states) != K or
                                  cache.heads != (self.cfg.n_heads, self.cfg.head_dim)):
            raise ValueError(f"cache holds {len(cache.states)} expert states of heads "
                             f"{cache.heads}; the layer has {K} experts and heads "
                             f"{(self.cfg.n_heads, self.cfg.head_dim)}")
        with validation_enabled(False):  # q, k, v come from the checked x: no second pass
            rotation = self._rotation(x, positions)
            if cache is not None and not cache.empty:
                return self._decode(x, weights, sparse, cache, rotation)
            return self._mix(x, weights, sparse, cache, lengths, rotation)

    def _shared_softmax(self, q: Tensor, k: Tensor, v: Tensor, weights: Tensor
                        ) -> tuple[Tensor | None, list[int]]:
        """On a short hard-routed sequence, the rows of every softmax expert through one
        attention (:mod:`~bayes_router.models.dense_mix`), weighted, as ``(B, T, H, d)``, and
        the experts it covered; ``(None, [])`` where it does not apply (a row with more than
        one expert, or a single softmax expert alone)."""
        shared = self._softmax_experts
        T = q.shape[2]
        if T > self.cfg.dense_hard_max_len or not shared:
            return None, []
        selected = weights != 0
        used = selected.any(1).any(0).tolist()
        shared = [e for e in shared if used[e]]
        if not shared or sum(used) < 2 or not bool((selected.sum(-1) == 1).all()):
            return None, []
        key = (T, q.dtype, q.device)
        if key not in self._row_masks:  # a few (T, T) masks per length: built once
            if len(self._row_masks) >= ROW_MASK_CACHE:
                del self._row_masks[next(iter(self._row_masks))]  # the oldest length
            self._row_masks[key] = row_masks(self.experts, *key)
        index = selected.to(torch.int8).argmax(-1)  # (B, T)
        o = shared_softmax(q, k, v, index, self._row_masks[key], shared)  # (B, H, T, d)
        w = weights.gather(-1, index[..., None])  # (B, T, 1), in the layer's dtype
        return o.transpose(1, 2).to(w.dtype) * w[..., None], shared

    def _decode(self, x: Tensor, weights: Tensor, sparse: bool, cache: LayerCache,
                rotation: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Continue the sequences of ``cache`` by ``x (B, T, D)``: every expert's state takes
        every sequence's new keys and values; an expert reads (computes queries) only for the
        sequences with weight on it (all of them unless ``sparse``)."""
        B, T, D = x.shape
        weights = weights.to(x.dtype)
        H, d, shared = self.cfg.n_heads, self.cfg.head_dim, self.cfg.shared_qkv
        shape = (B, T, H, d) if shared else (B, T, D)
        y = None
        if shared:
            q, k, v = self._heads(self.qkv(x), rotation)  # (B, H, T, d) each
        # which sequences read each expert: one synchronisation for the layer
        reads = (weights != 0).any(1).T.tolist() if sparse else [[True] * B] * len(self.experts)
        for i, expert in enumerate(self.experts):
            if not shared:
                q, k, v = self._heads(self.qkv[i](x), rotation)
            if not any(reads[i]):  # no sequence reads it: it only takes the new tokens
                expert.write_state(cache.states[i], k, v)
                continue
            w = weights[..., i]  # (B, T)
            rows = None
            if not all(reads[i]):
                rows = torch.tensor([b for b, read in enumerate(reads[i]) if read],
                                    dtype=torch.long, device=x.device)
            o = expert.decode(cache.states[i], q if rows is None else q[rows], k, v, rows)
            o = o.transpose(1, 2)  # (R, T, H, d)
            if not shared:
                o = self.out[i](o.reshape(o.shape[0], T, D))
            w_rows = w if rows is None else w[rows]
            term = w_rows.view(*w_rows.shape, *[1] * (o.dim() - 2)) * o.to(x.dtype)
            if rows is None:
                y = term if y is None else y + term
            else:
                y = (x.new_zeros(shape) if y is None else y).index_add(0, rows, term)
        if y is None:  # no expert has weight on any token
            y = x.new_zeros(shape)
        if shared:
            y = self.out(y.reshape(B, T, D))
        return y

    def _mix(self, x: Tensor, weights: Tensor, sparse: bool, cache: LayerCache | None = None,
             lengths: Tensor | None = None, rotation: tuple[Tensor, Tensor] | None = None
             ) -> Tensor:
        K = len(self.experts)
        lead = torch.broadcast_shapes(x.shape[:-2], weights.shape[:-2])
        T, D = x.shape[-2:]
        x = x.expand(*lead, T, D).reshape(-1, T, D)  # (B, T, D), particles folded into B
        # every term in the layer's dtype, whatever the weights' (their gradient flows back)
        weights = weights.expand(*lead, T, K).reshape(-1, T, K).to(x.dtype)
        B, shared = x.shape[0], self.cfg.shared_qkv
        H, d = self.cfg.n_heads, self.cfg.head_dim
        shape = (B, T, H, d) if shared else (B, T, D)
        y = None  # the weighted sum, started by the first expert's term (no zeros to add to)
        done = []
        if shared:
            q, k, v = self._heads(self.qkv(x), rotation)
            if sparse:
                y, done = self._shared_softmax(q, k, v, weights)
        for i, expert in enumerate(self.experts):
            if cache is not None:  # the prefill: every expert's state takes every token
                if not shared:
                    q, k, v = self._heads(self.qkv[i](x), rotation)
                cache.states[i] = expert.write_state(None, k, v, lengths, cache.capacity)
            if i in done:
                continue
            w = weights[..., i]  # (B, T)
            selected = w != 0
            if sparse and not bool(selected.any()):
                continue
            if not shared and cache is None:
                q, k, v = self._heads(self.qkv[i](x), rotation)
            if not sparse or bool(selected.all()):
                o = expert(q, k, v).transpose(1, 2)  # (B, T, H, d)
                if not shared:
                    o = self.out[i](o.reshape(B, T, D))
                term = w.view(B, T, *[1] * (o.dim() - 2)) * o.to(x.dtype)  # (autocast)
                y = term if y is None else y + term
                continue
            positions, valid = selected_positions(selected)  # (B, R)
            o = expert(q, k, v, positions).transpose(1, 2)  # (B, R, H, d)
            if not shared:
                o = self.out[i](o.reshape(B, -1, D))
            w_rows = w.gather(1, positions) * valid
            contribution = w_rows.view(*w_rows.shape, *[1] * (o.dim() - 2)) * o.to(x.dtype)
            index = positions.view(*positions.shape, *[1] * (o.dim() - 2)).expand_as(o)
            y = (x.new_zeros(shape) if y is None else y).scatter_add(1, index, contribution)
        if y is None:  # no expert has weight on any token
            y = x.new_zeros(shape)
        if shared:
            y = self.out(y.reshape(B, T, D))
        return y.reshape(*lead, T, D)


def random_gate(router: Router, generator: torch.Generator | None = None) -> Router:
    """``router`` with each decision's uncertainty replaced by a uniform draw in ``[0, 1)``
    (from ``generator``, else torch's global stream): gated routing then sends a fraction
    ``1 - gate_threshold`` of the tokens soft whatever the router thinks, the control of an
    uncertainty gate at the same soft fraction."""
    def gated(layer: int, features: Tensor) -> RoutingDecision:
        decision = router(layer, features)
        shape = decision.mean.shape[:-1]
        draw = torch.rand(shape, generator=generator, dtype=torch.float64)  # on the CPU
        decision.uncertainty = draw.to(decision.mean.dtype).to(decision.mean.device)
        return decision
    return gated


def check_gate_threshold(gate_threshold: float) -> None:
    """The rule of a gate threshold: a normalised entropy, in ``[0, 1]``."""
    if not 0.0 <= gate_threshold <= 1.0:
        raise ValueError(f"gate_threshold must be in [0, 1] (normalised entropy), got "
                         f"{gate_threshold}")


def routing_weights(decision: RoutingDecision, mode: str, gate_threshold: float | None = None
                    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Turn a router's decision into the weights a layer applies in ``mode``.

    Returns ``(weights, expert_index, hard_mask)``; ``hard`` uses the one-hot argmax of the
    expected weights, ``gated`` does so only where ``uncertainty < gate_threshold``.
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"mode must be one of {ROUTING_MODES}, got {mode!r}")
    if mode == "soft":
        return decision.weights, None, None
    index = decision.mean.argmax(-1)
    one_hot = nn.functional.one_hot(index, decision.mean.shape[-1]).to(decision.weights.dtype)
    if mode == "hard":
        return one_hot, index, torch.ones_like(index, dtype=torch.bool)
    if decision.uncertainty is None or gate_threshold is None:
        raise ValueError("gated routing needs a router that reports uncertainty and a "
                         "gate_threshold")
    check_gate_threshold(gate_threshold)
    hard = decision.uncertainty < gate_threshold
    weights = torch.where(hard[..., None], one_hot, decision.weights)
    return weights, torch.where(hard, index, -1), hard
