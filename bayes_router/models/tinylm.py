"""TinyLM: a character-level decoder-only transformer whose attention is routed per token.

The LM holds no inference logic: every forward pass takes a *router*, a callable
``router(layer, features) -> RoutingDecision`` supplied by the caller (the Pyro guide, a fixed set
of sampled weights, or the prior-free softmax controller).

Decoding passes a :class:`DecodeCache` (:meth:`TinyLM.new_cache`) to the same forward pass:
the first call is the prompt's prefill, each later call continues every sequence from its own
length (one token per step, or a chunk), the router deciding each new token's experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bayes_router.core.precision import autocast, full_precision, resolve_dtype
from bayes_router.core.validation import check_int
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.controller import _controller_features
from bayes_router.models.experts.base import common_value
from bayes_router.models.router import (
    LayerCache,
    LayerRouting,
    RoutedAttention,
    Router,
    RoutingDecision,
    routing_weights,
)


@dataclass
class LMOutput:
    """Logits ``(..., T, V)`` and the routing intermediates of every layer."""

    logits: Tensor
    routing: list[LayerRouting]


@dataclass
class DecodeCache:
    """The decoding state of a :class:`TinyLM`: one :class:`~bayes_router.models.router.
    LayerCache` per layer, and ``lengths (B,)``, the tokens each sequence holds so far. Made
    by :meth:`TinyLM.new_cache`, filled and advanced by the forward passes it is given."""

    layers: list[LayerCache]
    lengths: Tensor
    capacity: int
    filled: bool = field(default=False)
    #: set when a pass failed half-way: some states took its tokens and others did not, so
    #: the cache refuses further use (start a new one)
    failed: bool = field(default=False)

    def __post_init__(self):
        self.set_lengths(self.lengths)

    def set_lengths(self, lengths: Tensor) -> None:
        """Set every sequence's length, here and in every expert state that exists (a
        benchmark rewinds a cache this way)."""
        self.lengths, self.common_length = lengths, common_value(lengths)
        for layer in self.layers:
            for state in layer.states:
                if state is not None:
                    state.set_lengths(lengths)

    def advance(self, count: int, counts: Tensor | None = None) -> None:
        """After a pass: ``count`` more tokens in every sequence, or ``counts (B,)`` each (the
        expert states advance themselves as they are written)."""
        if counts is None:
            self.lengths = self.lengths + count
            if self.common_length is not None:
                self.common_length += count
        else:
            self.lengths = self.lengths + counts
            self.common_length = common_value(self.lengths)
        self.filled = True

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by every expert state of every layer, all sequences together."""
        return sum(layer.nbytes for layer in self.layers)


class Block(nn.Module):
    """Pre-norm transformer block: routed attention, then a GELU MLP."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = RoutedAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
        )

    def forward(self, h: Tensor, weights: Tensor, sparse: bool, cache: LayerCache | None = None,
                lengths: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        h = h + self.attn(self.ln_attn(h), weights, sparse=sparse, cache=cache, lengths=lengths,
                          positions=positions)
        return h + self.mlp(self.ln_mlp(h))


class TinyLM(nn.Module):
    """Token embeddings (and learned position embeddings, or rotary ones in every layer),
    ``n_layers`` routed blocks, final norm, LM head."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = (nn.Embedding(cfg.max_seq_len, cfg.d_model)
                                   if cfg.positions == "learned" else None)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        #: the dtype of the blocks' matmuls under autocast (``float32``: no autocast); a runtime
        #: setting, not part of the state dict (see :mod:`bayes_router.core.precision`)
        self.compute_dtype = torch.float32

    def set_precision(self, dtype: str | torch.dtype | None) -> None:
        """Run the blocks' linear layers, the experts and the output head in ``dtype``
        (``float32``, ``bfloat16`` or ``float16``) under autocast; the router and the norms
        stay ``float32``, and the logits are cast back to it before any likelihood."""
        self.compute_dtype = resolve_dtype(dtype)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def feature_dim(self) -> int:
        return self.cfg.d_model + 2

    def check_tokens(self, x: Tensor, name: str = "x") -> None:
        """Raise a clear error for token ids of the wrong shape, dtype, length or range: the one
        rule of token ids, applied where they enter (:meth:`forward`, a routed LM's Pyro model
        and guide)."""
        if not isinstance(x, Tensor) or x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor of token ids, got "
                            f"{getattr(x, 'dtype', type(x))}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (B, T), got {tuple(x.shape)}")
        limit = self.cfg.max_context
        if limit is not None and x.shape[1] > limit:
            raise ValueError(f"{name} has T={x.shape[1]} > max_seq_len={limit}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.cfg.vocab_size):
            raise ValueError(f"{name} holds token ids outside [0, {self.cfg.vocab_size}): "
                             f"min {int(x.min())}, max {int(x.max())}")

    def new_cache(self, batch_size: int, capacity: int | None = None) -> DecodeCache:
        """An empty :class:`DecodeCache` for ``batch_size`` sequences of up to ``capacity``
        tokens each (default ``max_seq_len``; at most ``max_seq_len`` with learned positions,
        any length with rotary ones: the full expert's cache holds that many)."""
        capacity = self.cfg.max_seq_len if capacity is None else capacity
        limit = self.cfg.max_context
        check_int("batch_size", batch_size)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1 or (
                limit is not None and capacity > limit):
            allowed = "an integer >= 1" if limit is None else f"an integer in [1, max_seq_len=" \
                                                             f"{limit}]"
            raise ValueError(f"capacity must be {allowed}, got {capacity!r}")
        device = self.token_embedding.weight.device
        return DecodeCache([block.attn.new_cache(capacity) for block in self.blocks],
                           torch.zeros(batch_size, dtype=torch.long, device=device), capacity)

    def _positions(self, x: Tensor, cache: DecodeCache, lengths: Tensor | None
                   ) -> tuple[Tensor, Tensor]:
        """The positions ``(B, T)`` of the tokens ``x`` continuing ``cache``, and how many of
        them are real per sequence; clear errors for a batch, a length or a position the
        cache or the model cannot take."""
        B, T = x.shape
        if not isinstance(cache, DecodeCache):
            raise ValueError(f"cache must be a DecodeCache (TinyLM.new_cache), got "
                             f"{type(cache).__name__}")
        if cache.failed:
            raise ValueError("this cache was left half-written by a pass that failed; start a "
                             "new one with new_cache")
        if len(cache.layers) != len(self.blocks) or any(
                layer.heads != (self.cfg.n_heads, self.cfg.head_dim) for layer in cache.layers):
            raise ValueError(f"the cache was made for another model ({len(cache.layers)} "
                             f"layers, heads {cache.layers[0].heads if cache.layers else None}); "
                             f"this one has {len(self.blocks)} layers of "
                             f"{(self.cfg.n_heads, self.cfg.head_dim)} heads")
        if B != cache.batch_size:
            raise ValueError(f"x has {B} sequences, the cache {cache.batch_size}")
        if T == 0:
            raise ValueError("x must hold at least one token per sequence to decode")
        if lengths is not None and cache.filled:
            raise ValueError("lengths (right-padded prompts) applies to the prefill only; "
                             "later calls continue every sequence by all of x's tokens")
        common = cache.common_length
        if cache.filled and T > 1 and common is None:
            raise ValueError("sequences of different lengths continue one token at a time "
                             f"(x of {T} tokens per sequence)")
        counts = None  # every sequence advances by T
        if lengths is not None:
            counts = torch.as_tensor(lengths, device=x.device)
            if counts.is_floating_point() or counts.dtype == torch.bool or \
                    counts.shape != (B,) or bool((counts < 1).any()) or \
                    bool((counts > T).any()):
                raise ValueError(f"lengths must hold one integer prompt length in [1, {T}] "
                                 f"per sequence, got {counts.tolist()}")
            counts = counts.long()
        end = common + T if common is not None else int((cache.lengths + T).max())
        if self.cfg.max_context is not None and end > self.cfg.max_context:
            raise ValueError(f"decoding to {end} tokens is past what the model supports "
                             f"(max_seq_len={self.cfg.max_seq_len}: its learned positions end "
                             f"there)")
        if end > cache.capacity:
            raise ValueError(f"decoding to {end} tokens is past the cache's capacity "
                             f"{cache.capacity}")
        if common is not None:  # no device synchronisation in a step
            return torch.arange(common, end, device=x.device).expand(B, T), counts
        return cache.lengths[:, None] + torch.arange(T, device=x.device), counts

    def forward(self, x: Tensor, router: Router, mode: str = "soft",
                gate_threshold: float | None = None, cache: DecodeCache | None = None,
                lengths: Tensor | None = None, *, tokens_checked: bool = False) -> LMOutput:
        """Run the LM on token ids ``x (B, T)``, asking ``router`` for every layer's weights.

        Routing weights may carry extra leading dimensions (e.g. vectorised particles); the
        hidden state then broadcasts to them.

        :param cache: decode (no particle dimensions): an empty cache is filled by this pass
            over the prompts ``x``; a filled one is continued by ``x``, every sequence from its
            own length, and advanced. The logits are those of the whole-sequence pass at the
            same positions under the same routing.
        :param lengths: ``(B,)`` the real length of each right-padded prompt (the prefill
            only); the logits past a prompt's length are not meaningful.
        :param tokens_checked: the caller has checked ``x`` with :meth:`check_tokens` at its
            own boundary (a routed LM's Pyro model and guide do), so the pass trusts it, as
            ``validate_args=False`` does in ``torch.distributions``.
        """
        if not tokens_checked:
            self.check_tokens(x)
        T = x.shape[1]
        positions = counts = None
        if cache is None:
            if lengths is not None:
                raise ValueError("lengths (right-padded prompts) needs a cache")
            h = self.token_embedding(x)  # (B, T, D)
            if self.position_embedding is not None:
                h = h + self.position_embedding.weight[:T]
        else:
            positions, counts = self._positions(x, cache, lengths)
            h = self.token_embedding(x)
            if self.position_embedding is not None:
                h = h + self.position_embedding(positions)
        prefill = lengths if cache is not None and not cache.filled else None
        try:
            out = self._layers(h, router, mode, gate_threshold, cache, prefill, positions)
        except BaseException:
            if cache is not None:  # some states took the tokens, others did not
                cache.failed = True
            raise
        if cache is not None:
            cache.advance(T, counts)
        return out

    def _layers(self, h: Tensor, router: Router, mode: str, gate_threshold: float | None,
                cache: DecodeCache | None, prefill: Tensor | None, positions: Tensor | None
                ) -> LMOutput:
        """The blocks, the final norm and the head on the embedded tokens ``h``."""
        routing = []
        with autocast(h.device, self.compute_dtype):
            for layer, block in enumerate(self.blocks):
                with full_precision(h.device, self.compute_dtype):  # the router's maths
                    # the positions were checked against max_seq_len on entry
                    features = _controller_features(h, self.cfg.max_seq_len, positions,
                                                    self.cfg.positions)
                    decision = router(layer, features)
                    weights, index, hard = routing_weights(decision, mode, gate_threshold)
                h = block(h, weights, sparse=mode != "soft",
                          cache=None if cache is None else cache.layers[layer], lengths=prefill,
                          positions=positions)
                routing.append(LayerRouting(features, decision, weights, index, hard))
            logits = self.head(self.ln_final(h))
        return LMOutput(logits.to(h.dtype), routing)  # the likelihood in full precision


class FixedRouting:
    """A router that returns given weights per layer (e.g. samples replayed from a trace)."""

    def __init__(self, weights: list[Tensor]):
        self.weights = list(weights)
        for i, w in enumerate(self.weights):
            if not isinstance(w, Tensor) or not w.is_floating_point() or w.dim() < 2:
                raise ValueError(f"FixedRouting: weights[{i}] must be a floating (..., T, K) "
                                 f"tensor, got {getattr(w, 'shape', type(w).__name__)}")

    def __call__(self, layer: int, features: Tensor) -> RoutingDecision:
        if not 0 <= layer < len(self.weights):
            raise ValueError(f"FixedRouting holds weights for {len(self.weights)} layers, asked "
                             f"for layer {layer}: give one (..., T, K) tensor per layer")
        w = self.weights[layer]
        return RoutingDecision(weights=w, mean=w)
