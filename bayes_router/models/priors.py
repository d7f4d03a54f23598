"""The Bayesian router's priors: the Dirichlet concentrations over routing weights, in float64.

Two constructions, named by :data:`PRIORS`:

``"power"``
    :func:`compute_aware_prior`, ``beta_l = beta0[l] * pi`` with ``pi ∝ c^-eta`` (or, with
    ``prior_mean="learn"`` (:data:`PRIOR_MEANS`), a learned per-layer mean ``pi_l``);
``"seed"``
    :func:`seed_prior`, the public prototype's ``beta_l = epsilon + beta0[l] (1 - c)``.

The model's ``alpha`` sites draw from a :class:`RoutingPrior`, whose KL from a Dirichlet guide
has a fused closed form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import register_kl

from bayes_router.core.dirichlet import fused_dirichlet_kl

PRIORS = ("power", "seed")
PRIOR_MEANS = ("fixed", "learn")
#: The ``seed`` prior's offset: ``beta_k = SEED_EPSILON + beta0 (1 - c_k)``.
SEED_EPSILON = 0.01


def compute_aware_prior(costs: Tensor, beta0: float | Sequence[float] | Tensor, eta: float = 1.0
                        ) -> Tensor:
    """Dirichlet concentration ``beta0[l] * pi`` with ``pi ∝ c^-eta`` normalised to sum 1.

    :param costs: ``(K,)`` positive relative costs.
    :param beta0: total concentration, a scalar or one value per layer (``(L,)``).
    :param eta: cost sensitivity; ``eta = 0`` gives the uniform, cost-blind prior.
    :returns: ``(K,)`` for a scalar ``beta0``, else ``(L, K)``.
    """
    costs = torch.as_tensor(costs)
    if not costs.is_floating_point():
        costs = costs.to(torch.get_default_dtype())
    if costs.dim() != 1 or not bool((costs > 0).all()) or not bool(torch.isfinite(costs).all()):
        raise ValueError(f"costs must be a 1-D tensor of positive finite values, got {costs}")
    beta0 = torch.as_tensor(beta0, dtype=costs.dtype)
    if not bool((beta0 > 0).all()) or not bool(torch.isfinite(beta0).all()):
        raise ValueError(f"beta0 must be > 0 (a scalar or one value per layer), got {beta0}")
    if not math.isfinite(eta):
        raise ValueError(f"eta must be finite, got {eta}")
    pi = costs.pow(-eta)
    pi = pi / pi.sum()
    return beta0[..., None] * pi


def seed_prior(costs: Tensor, beta0: float | Sequence[float] | Tensor,
               epsilon: float = SEED_EPSILON) -> Tensor:
    """The public prototype's prior: ``beta_k = epsilon + beta0[l] (1 - c_k)``.

    With the seed costs ``[1.0, 0.15, 0.30]`` and ``beta0 = 1``: ``[0.01, 0.86, 0.71]``, mean
    ``[0.006, 0.544, 0.449]``. Its guide is ``beta + softplus(MLP(features))``, so it never puts
    less concentration than the prior on any expert.

    :param costs: ``(K,)`` costs relative to ``full``, each in ``(0, 1]``.
    :returns: ``(K,)`` for a scalar ``beta0``, else ``(L, K)``.
    """
    costs = torch.as_tensor(costs)
    if not costs.is_floating_point():
        costs = costs.to(torch.get_default_dtype())
    if costs.dim() != 1 or not bool(((costs > 0) & (costs <= 1)).all()):
        raise ValueError(f"the seed prior needs costs in (0, 1] (relative to full), got "
                         f"{costs.tolist()}")
    beta0 = torch.as_tensor(beta0, dtype=costs.dtype)
    if not bool((beta0 > 0).all()) or not bool(torch.isfinite(beta0).all()):
        raise ValueError(f"beta0 must be > 0 (a scalar or one value per layer), got {beta0}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    return epsilon + beta0[..., None] * (1 - costs)


class RoutingPrior(dist.Dirichlet):
    """The Dirichlet of the model's ``alpha`` sites, the same distribution as ``dist.Dirichlet``:
    a class of its own only so that the KL from any Dirichlet guide (every analytic-KL ELBO
    reads it, two layers a step) runs through
    :func:`~bayes_router.core.dirichlet.fused_dirichlet_kl`, one autograd node with the
    closed-form gradient, instead of torch's generic rule (the same numbers to rounding,
    tested; faster, see ``docs/experts.md``, SVI step)."""


@register_kl(torch.distributions.Dirichlet, RoutingPrior)
def _kl_dirichlet_routing_prior(q: torch.distributions.Dirichlet, p: RoutingPrior) -> Tensor:
    return fused_dirichlet_kl(q.concentration, p.concentration)
