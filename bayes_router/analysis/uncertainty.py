"""Per-token routing uncertainty of a Dirichlet routing posterior ``q(alpha) = Dir(a)``.

With ``a0 = sum_k a_k`` and posterior mean ``m = a / a0``, the uncertainty about which expert a
token uses (``z ~ Categorical(alpha)``) splits as

- total ``H(m)``, the entropy of the posterior-mean routing,
- aleatoric ``E_q[H(alpha)] = -sum_k m_k (digamma(a_k + 1) - digamma(a0 + 1))``, the routing
  ambiguity the posterior is sure of (a token that genuinely mixes experts),
- epistemic ``I(z; alpha) = total - aleatoric``, the mutual information between the expert choice
  and the routing weights: what more evidence would resolve. It is non-negative,
- the concentration ``a0`` (evidence): large ``a0`` means a sharp posterior.

All functions take concentrations ``(..., K)`` as a tensor (results are tensors of the same dtype
and device, differentiable) or an array (results are float64 NumPy arrays), and reduce the last
axis.

References:
  - *Evidential Deep Learning to Quantify Classification Uncertainty*, Sensoy, Kaplan, Kandemir
    (NeurIPS 2018)
  - *Predictive Uncertainty Estimation via Prior Networks*, Malinin, Gales (NeurIPS 2018)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bayes_router.analysis._checks import float_array

Array = Tensor | np.ndarray


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
