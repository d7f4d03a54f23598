"""Dirichlet maths shared by every layer of the package (a leaf: it imports only numpy and torch).

**Precision.** In ``float32``, Dirichlet draws at the guide floor (concentrations near 0.05)
underflow to the smallest normal number: ``torch``'s Dirichlet backward then overflows to NaN,
and the clamped draws bias every estimator (measured at ``a = (0.05, 0.05, 1)``: 1.6 % for
``reparam-mc``, 7 % for ``rsvi``, 13 % for ``score``). In ``float64`` an underflow at
``a >= 0.01`` has probability below ``1e-13`` per entry, so the Dirichlet sites of every model and
guide (concentrations, samples, log-densities, KL terms) are computed in :data:`SAMPLING_DTYPE`,
and samples are cast back to the network's dtype where they weight the experts.

**Sufficient statistics and KL.** :func:`expected_log_alpha` (``E[log alpha_k] = psi(a_k) -
psi(a0)``), :func:`dirichlet_kl` and :func:`dirichlet_kl_to_prior`.

**Per-token routing uncertainty** of a Dirichlet routing posterior ``q(alpha) = Dir(a)``. With
``a0 = sum_k a_k`` and posterior mean ``m = a / a0``, the uncertainty about which expert a token
uses (``z ~ Categorical(alpha)``) splits as

- total ``H(m)``, the entropy of the posterior-mean routing,
- aleatoric ``E_q[H(alpha)] = -sum_k m_k (digamma(a_k + 1) - digamma(a0 + 1))``, the routing
  ambiguity the posterior is sure of (a token that genuinely mixes experts),
- epistemic ``I(z; alpha) = total - aleatoric``, the mutual information between the expert choice
  and the routing weights: what more evidence would resolve. It is non-negative,
- the concentration ``a0`` (evidence): large ``a0`` means a sharp posterior.

The uncertainty functions take concentrations ``(..., K)`` as a tensor (results are tensors of
the same dtype and device, differentiable) or an array (results are float64 NumPy arrays), and
reduce the last axis.

References:
  - *Evidential Deep Learning to Quantify Classification Uncertainty*, Sensoy, Kaplan, Kandemir
    (NeurIPS 2018)
  - *Predictive Uncertainty Estimation via Prior Networks*, Malinin, Gales (NeurIPS 2018)
  - *Estimating a Dirichlet distribution*, Thomas P. Minka (technical report, 2000)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bayes_router.core.arrays import float_array

Array = Tensor | np.ndarray

#: The dtype of every Dirichlet site's concentration, sample and log-density.
SAMPLING_DTYPE = torch.float64


def normalised_entropy(p: Tensor) -> Tensor:
    """``H(p) / log K`` along the last dimension, in ``[0, 1]`` (``0 log 0 = 0``)."""
    return -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(p.shape[-1])


def expected_log_alpha(concentration: Tensor) -> Tensor:
    """``E[log alpha_k] = psi(a_k) - psi(a0)`` under ``Dir(a)``, over the last dim ``(..., K)``."""
    concentration = torch.as_tensor(concentration)
    if concentration.dim() < 1 or concentration.shape[-1] < 2:
        raise ValueError("concentration must have shape (..., K) with K >= 2, got "
                         f"{tuple(concentration.shape)}")
    if not bool(torch.isfinite(concentration).all()) or not bool((concentration > 0).all()):
        raise ValueError("concentration must hold positive finite values")
    return torch.digamma(concentration) - torch.digamma(concentration.sum(-1, keepdim=True))


def log_beta(concentration: Tensor) -> Tensor:
    """``log B(a) = sum_k lgamma(a_k) - lgamma(a0)`` over the last dim."""
    return torch.lgamma(concentration).sum(-1) - torch.lgamma(concentration.sum(-1))


def dirichlet_kl(q: Tensor, p: Tensor) -> Tensor:
    """``KL(Dir(q) || Dir(p))`` over the last dim (broadcasting the leading ones)."""
    return log_beta(p) - log_beta(q) + ((q - p) * expected_log_alpha(q)).sum(-1)


def _sum_experts(x: Tensor) -> Tensor:
    """``x.sum(-1)`` as a product with a column of ones: on routing shapes (``K = 3``) torch's
    reduction over a last dimension of three is several times slower (``docs/experts.md``, SVI
    step)."""
    return (x @ x.new_ones(x.shape[-1], 1)).squeeze(-1)


def _distinct(x: Tensor) -> Tensor:
    """The distinct rows of a broadcast view ``(..., K)``: size 1 along every stride-0 leading
    dimension (a prior expanded over tokens and batch holds one row of ``K`` numbers), still
    broadcasting to ``x``'s shape. The last (expert) dimension keeps its size even where it is
    stride 0 (a symmetric prior expanded from one value): its sums need every term."""
    size = [1 if stride == 0 else n for n, stride in zip(x.shape[:-1], x.stride()[:-1])]
    return x.as_strided([*size, x.shape[-1]], x.stride())


class _DirichletKL(torch.autograd.Function):
    """``KL(Dir(a) || Dir(b))`` with its closed-form gradient, ``a0 = sum a``, ``b0 = sum b``:

    - ``dKL / da_k = (a_k - b_k) psi'(a_k) - (a0 - b0) psi'(a0)``,
    - ``dKL / db_k = psi(b_k) - psi(b0) - psi(a_k) + psi(a0)``.

    The backward reuses the forward's ``psi(a)`` and ``psi(a0)``, where autograd through
    :func:`dirichlet_kl` recomputes them and builds a graph of about twenty small operations;
    the terms of ``b`` run on its distinct entries only (:func:`_distinct`).
    """

    @staticmethod
    def forward(ctx, a, b):
        b = _distinct(b)
        a0, b0 = _sum_experts(a), _sum_experts(b)
        psi_a, psi_a0 = torch.digamma(a), torch.digamma(a0)
        kl = (torch.lgamma(a0) - torch.lgamma(b0)
              - _sum_experts(torch.lgamma(a)) + _sum_experts(torch.lgamma(b))
              + _sum_experts((a - b) * (psi_a - psi_a0[..., None])))
        ctx.save_for_backward(a, b, a0, b0, psi_a, psi_a0)
        return kl

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph: this backward's own graph would be partial
            raise RuntimeError("fused_dirichlet_kl is differentiable once; use dirichlet_kl "
                               "for higher derivatives")
        a, b, a0, b0, psi_a, psi_a0 = ctx.saved_tensors
        grad = grad[..., None]
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            total = (a0 - b0) * torch.polygamma(1, a0)
            grad_a = (grad * ((a - b) * torch.polygamma(1, a) - total[..., None])).to(a.dtype)
        if ctx.needs_input_grad[1]:
            psi_b = torch.digamma(b) - torch.digamma(b0)[..., None]
            # per entry of the broadcast b: autograd sums it back over the expanded dims
            grad_b = (grad * (psi_b - psi_a + psi_a0[..., None])).to(b.dtype)
        return grad_a, grad_b


def fused_dirichlet_kl(q: Tensor, p: Tensor) -> Tensor:
    """``KL(Dir(q) || Dir(p))`` over the last dim, as :func:`dirichlet_kl` (its reference twin,
    tested against it, torch's ``kl_divergence`` and finite differences), in one autograd node
    with the closed-form gradient, faster forward and backward on a layer of routing sites
    (``docs/experts.md``, SVI step). Differentiable once: a backward with ``create_graph=True``
    raises rather than return a gradient whose own derivative would be wrong; not for
    ``torch.func`` transforms (``dirichlet_kl`` supports both)."""
    q, p = torch.as_tensor(q), torch.as_tensor(p)
    shape = torch.broadcast_shapes(q.shape, p.shape)
    return _DirichletKL.apply(q.expand(shape), p.expand(shape))


def dirichlet_kl_to_prior(concentration: Tensor, beta0: float, pi: Tensor) -> Tensor:
    """``KL(Dir(a_t) || Dir(beta0 pi))`` for every row ``a_t`` of ``concentration (N, K)``."""
    prior = float(beta0) * torch.as_tensor(pi, dtype=concentration.dtype)
    return dirichlet_kl(concentration, prior)


@dataclass(frozen=True)
class RoutingUncertainty:
    """Uncertainty decomposition of a Dirichlet routing posterior, each of shape ``(...)``.

    :ivar total: ``H(m)`` in nats.
    :ivar aleatoric: expected entropy ``E_q[H(alpha)]`` in nats.
    :ivar epistemic: mutual information ``total - aleatoric`` in nats (>= 0).
    :ivar concentration: total concentration ``a0``.
    """

    total: Array
    aleatoric: Array
    epistemic: Array
    concentration: Array


def _concentration(concentration) -> tuple[Tensor, Callable[[Tensor], Array]]:
    """Validated float64 tensor ``(..., K)`` and a function returning results in the input's
    kind (tensor of the input dtype and device, or NumPy array)."""
    if isinstance(concentration, Tensor):
        if not concentration.is_floating_point():
            concentration = concentration.double()
        if concentration.dim() == 0 or concentration.numel() == 0:
            raise ValueError(
                f"concentration must be non-empty with a last (expert) axis, got shape "
                f"{tuple(concentration.shape)}"
            )
        if not torch.isfinite(concentration).all():
            raise ValueError("concentration contains NaN or Inf")
        dtype = concentration.dtype
        a = concentration.double()

        def restore(x: Tensor) -> Tensor:
            return x.to(dtype)
    else:
        a = torch.from_numpy(float_array(concentration, "concentration"))
        if a.dim() == 0:
            raise ValueError("concentration must have a last (expert) axis, got a scalar")

        def restore(x: Tensor) -> np.ndarray:
            return x.detach().numpy()
    if (a <= 0).any():
        raise ValueError(f"concentration must be > 0, got minimum {a.min().item():g}")
    return a, restore


def _psi_minus_log(x: Tensor) -> Tensor:
    """``digamma(x + 1) - log x``, which tends to ``1 / (2 x)`` for large ``x``."""
    return torch.digamma(x + 1) - torch.log(x)


def _total(a: Tensor) -> Tensor:
    m = a / a.sum(-1, keepdim=True)
    return -(m * torch.log(m)).sum(-1)


def _aleatoric(a: Tensor) -> Tensor:
    a0 = a.sum(-1, keepdim=True)
    m = a / a0
    return -(m * (torch.digamma(a + 1) - torch.digamma(a0 + 1))).sum(-1)


def _epistemic(a: Tensor) -> Tensor:
    # total - aleatoric rearranged to sum_k m_k g(a_k) - g(a0) with g(x) = digamma(x+1) - log x:
    # no cancellation of two O(log K) terms when the posterior is sharp (a0 large).
    a0 = a.sum(-1, keepdim=True)
    m = a / a0
    mi = (m * _psi_minus_log(a)).sum(-1) - _psi_minus_log(a0).squeeze(-1)
    return mi.clamp_min(0.0)  # >= 0 exactly; rounding can leave -1e-17


def total_uncertainty(concentration) -> Array:
    """Entropy ``H(m)`` of the posterior-mean routing ``m = a / a0`` (nats)."""
    a, restore = _concentration(concentration)
    return restore(_total(a))


def aleatoric_uncertainty(concentration) -> Array:
    """Expected entropy ``E_{Dir(a)}[H(alpha)]`` (nats)."""
    a, restore = _concentration(concentration)
    return restore(_aleatoric(a))


def epistemic_uncertainty(concentration) -> Array:
    """Mutual information ``H(m) - E[H(alpha)]`` between expert choice and routing weights
    (nats, >= 0). Computed in a cancellation-free form that agrees with the difference up to
    rounding."""
    a, restore = _concentration(concentration)
    return restore(_epistemic(a))


def total_concentration(concentration) -> Array:
    """Evidence ``a0 = sum_k a_k``."""
    a, restore = _concentration(concentration)
    return restore(a.sum(-1))


def routing_uncertainty(concentration) -> RoutingUncertainty:
    """All four quantities at once for concentrations ``(..., K)``.

    :param concentration: Dirichlet concentrations ``a`` of the routing posterior, all > 0.
    """
    a, restore = _concentration(concentration)
    return RoutingUncertainty(
        total=restore(_total(a)),
        aleatoric=restore(_aleatoric(a)),
        epistemic=restore(_epistemic(a)),
        concentration=restore(a.sum(-1)),
    )
