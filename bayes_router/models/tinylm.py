"""TinyLM: a character-level decoder-only transformer whose attention is routed per token.

The LM holds no inference logic: every forward pass takes a *router*, a callable
``router(layer, features) -> RoutingDecision`` supplied by the caller (the Pyro guide, a fixed set
of sampled weights, or the prior-free softmax controller).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bayes_router.core.precision import autocast, full_precision, resolve_dtype
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.router import (
    LayerRouting,
    RoutedAttention,
    Router,
    RoutingDecision,
    controller_features,
    routing_weights,
)


@dataclass
class LMOutput:
    """Logits ``(..., T, V)`` and the routing intermediates of every layer."""

    logits: Tensor
    routing: list[LayerRouting]


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

    def forward(self, h: Tensor, weights: Tensor, sparse: bool) -> Tensor:
        h = h + self.attn(self.ln_attn(h), weights, sparse=sparse)
        return h + self.mlp(self.ln_mlp(h))


class TinyLM(nn.Module):
    """Token and position embeddings, ``n_layers`` routed blocks, final norm, LM head."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.d_model)
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
        """Raise a clear error for token ids of the wrong shape, dtype or range."""
        if not isinstance(x, Tensor) or x.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor of token ids, got "
                            f"{getattr(x, 'dtype', type(x))}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (B, T), got {tuple(x.shape)}")
        if x.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"{name} has T={x.shape[1]} > max_seq_len={self.cfg.max_seq_len}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.cfg.vocab_size):
            raise ValueError(f"{name} holds token ids outside [0, {self.cfg.vocab_size}): "
                             f"min {int(x.min())}, max {int(x.max())}")

    def forward(self, x: Tensor, router: Router, mode: str = "soft",
                gate_threshold: float | None = None) -> LMOutput:
        """Run the LM on token ids ``x (B, T)``, asking ``router`` for every layer's weights.

        Routing weights may carry extra leading dimensions (e.g. vectorised particles); the
        hidden state then broadcasts to them.
        """
        self.check_tokens(x)
        T = x.shape[1]
        h = self.token_embedding(x) + self.position_embedding.weight[:T]  # (B, T, D)
        routing = []
        with autocast(h.device, self.compute_dtype):
            for layer, block in enumerate(self.blocks):
                with full_precision(h.device, self.compute_dtype):  # the router's maths
                    features = controller_features(h, self.cfg.max_seq_len)  # (..., T, D+2)
                    decision = router(layer, features)
                    weights, index, hard = routing_weights(decision, mode, gate_threshold)
                h = block(h, weights, sparse=mode != "soft")
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
