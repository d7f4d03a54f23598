"""Naive twins of the experts: dense masks and explicit cumulative sums, obviously correct and
slow (``O(T^2)`` memory). The tests compare every fast kernel's outputs and gradients with them;
each expert's :meth:`~bayes_router.models.experts.base.AttentionExpert.naive` calls its twin."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def elu_feature_map(x: Tensor) -> Tensor:
    """The linear expert's positive feature map ``elu(x) + 1`` (Katharopoulos et al., 2020)."""
    return F.elu(x).add_(1.0)  # one pass less: elu saves its input, not its output


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
