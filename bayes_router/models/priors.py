"""The Bayesian router's priors: the Dirichlet concentrations over routing weights, in float64.

Two constructions, named by :data:`PRIORS`:

``"power"``
    :func:`compute_aware_prior`, ``beta_l = beta0[l] * pi`` with ``pi ∝ c^-eta`` (or, with
    ``prior_mean="learn"`` (:data:`PRIOR_MEANS`), a learned per-layer mean ``pi_l``);
``"seed"``
    :func:`seed_prior`, the public prototype's ``beta_l = epsilon + beta0[l] (1 - c)``.

The model's ``alpha`` sites draw from a :class:`RoutingPrior`, whose KL from a Dirichlet guide
has a fused closed form. :func:`check_prior_options` is the one home of the rules of the prior's
options (``beta0``, ``prior`` with ``prior_mean``, ...), which the training configuration and the
model both apply at their construction.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import register_kl

from bayes_router.core.dirichlet import fused_dirichlet_kl
from bayes_router.core.validation import check_positive

PRIORS = ("power", "seed")
PRIOR_MEANS = ("fixed", "learn")
#: The ``seed`` prior's offset: ``beta_k = SEED_EPSILON + beta0 (1 - c_k)``.
SEED_EPSILON = 0.01


def check_prior_options(beta0: float | Sequence[float] | str = 1.0, eta: float = 1.0,
                        a_min: float = 0.05, beta0_init: float = 1.0, prior: str = "power",
                        prior_mean: str = "fixed", n_layers: int | None = None) -> None:
    """The Bayesian router's prior options, checked in one place: by
    :class:`~bayes_router.inference.train_config.TrainConfig` at its construction and by
    :class:`~bayes_router.models.bayesian.BayesianRoutedLM` at its own (its boundary when it is
    built without a configuration). Arguments as the model's.

    :param n_layers: the LM's layers, which a per-layer ``beta0`` must match (``None``: any
        count, for a configuration that does not know the LM).
    :raises ValueError: naming the option and what it allows.
    """
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    if prior_mean not in PRIOR_MEANS:
        raise ValueError(f"prior_mean must be one of {PRIOR_MEANS}, got {prior_mean!r}")
    if prior == "seed" and prior_mean == "learn":
        raise ValueError("prior_mean 'learn' needs prior 'power' (the seed prior has no "
                         "separate mean)")
    check_beta0(beta0, n_layers)
    check_positive("beta0_init", beta0_init)  # one number, > 0 also once in float32:
    check_concentration("beta0_init", beta0_init, None, torch.float32)
    check_positive("a_min", a_min)
    _check_eta(eta)


def check_beta0(beta0: float | Sequence[float] | Tensor | str, n_layers: int | None = None
                ) -> None:
    """The rule of ``beta0``: ``"learn"``, or one number or one per layer (``n_layers`` of
    them, where given), each > 0 and finite in float32, the dtype the model keeps it in
    (:func:`check_concentration`).

    :raises ValueError: naming ``beta0`` and what it allows.
    """
    if isinstance(beta0, str):
        if beta0 != "learn":
            raise ValueError(f"beta0 must be > 0, a list of values > 0, or 'learn'; got "
                             f"{beta0!r}")
        return
    check_concentration("beta0", beta0, n_layers, torch.float32)


def check_concentration(name: str, value, n_layers: int | None = None,
                        dtype: torch.dtype = torch.float32) -> None:
    """The rule of a concentration such as ``beta0``: one number or one per layer
    (``n_layers`` of them, where given), each > 0 and finite once in ``dtype``, the dtype it
    is kept in.

    :raises ValueError: naming ``name`` and what it allows.
    """
    try:
        if isinstance(value, str):
            raise TypeError
        values = torch.as_tensor(value).detach().to(torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number > 0 or one per layer, got {value!r}"
                         ) from None
    if values.dim() > 1 or values.numel() == 0 or (
            n_layers is not None and values.numel() not in (1, n_layers)):
        layers = "" if n_layers is None else f" ({n_layers} layers)"
        raise ValueError(f"{name} must be one number or one per layer{layers}, got "
                         f"{values.numel()} values {value!r}")
    kept = values.to(dtype)
    if not bool((kept > 0).all()):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if not bool(torch.isfinite(kept).all()):
        raise ValueError(f"{name} must be finite in {str(dtype).removeprefix('torch.')} (at "
                         f"most {torch.finfo(dtype).max:.3g}), got {value!r}")


def _check_eta(eta: float) -> None:
    if not (isinstance(eta, numbers.Real) and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number, got {eta!r}")


def check_costs(costs: Tensor, prior: str = "power") -> Tensor:
    """``costs`` as a floating tensor, if ``prior`` can take them: ``(K,)`` positive and finite, and
    for the ``seed`` prior each in ``(0, 1]`` (relative to ``full``)."""
    costs = torch.as_tensor(costs)
    if not costs.is_floating_point():
        costs = costs.to(torch.get_default_dtype())
    if prior == "seed":
        if costs.dim() != 1 or not bool(((costs > 0) & (costs <= 1)).all()):
            raise ValueError(f"the seed prior needs costs in (0, 1] (relative to full), got "
                             f"{costs.tolist()}")
    elif costs.dim() != 1 or not bool((costs > 0).all()) or not bool(
            torch.isfinite(costs).all()):
        raise ValueError(f"costs must be a 1-D tensor of positive finite values, got {costs}")
    return costs


def compute_aware_prior(costs: Tensor, beta0: float | Sequence[float] | Tensor, eta: float = 1.0
                        ) -> Tensor:
    """Dirichlet concentration ``beta0[l] * pi`` with ``pi ∝ c^-eta`` normalised to sum 1.

    A public function: it checks its arguments (``beta0`` finite in the costs' dtype).
    :class:`~bayes_router.models.bayesian.BayesianRoutedLM`, which checked its own at
    construction, computes its prior at every step without the checks.

    :param costs: ``(K,)`` positive relative costs.
    :param beta0: total concentration, a scalar or one value per layer (``(L,)``).
    :param eta: cost sensitivity; ``eta = 0`` gives the uniform, cost-blind prior.
    :returns: ``(K,)`` for a scalar ``beta0``, else ``(L, K)``.
    """
    costs = check_costs(costs)
    check_concentration("beta0", beta0, None, costs.dtype)
    _check_eta(eta)
    return _power_prior(costs, beta0, eta)


def _power_prior(costs: Tensor, beta0: float | Sequence[float] | Tensor, eta: float) -> Tensor:
    """:func:`compute_aware_prior` on checked arguments."""
    pi = costs.pow(-eta)
    pi = pi / pi.sum()
    return torch.as_tensor(beta0, dtype=costs.dtype)[..., None] * pi


def seed_prior(costs: Tensor, beta0: float | Sequence[float] | Tensor,
               epsilon: float = SEED_EPSILON) -> Tensor:
    """The public prototype's prior: ``beta_k = epsilon + beta0[l] (1 - c_k)``.

    With the seed costs ``[1.0, 0.15, 0.30]`` and ``beta0 = 1``: ``[0.01, 0.86, 0.71]``, mean
    ``[0.006, 0.544, 0.449]``. Its guide is ``beta + softplus(MLP(features))``, so it never puts
    less concentration than the prior on any expert. Checks its arguments, as
    :func:`compute_aware_prior` does.

    :param costs: ``(K,)`` costs relative to ``full``, each in ``(0, 1]``.
    :returns: ``(K,)`` for a scalar ``beta0``, else ``(L, K)``.
    """
    costs = check_costs(costs, "seed")
    check_concentration("beta0", beta0, None, costs.dtype)
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    return _seed_prior(costs, beta0, epsilon)


def _seed_prior(costs: Tensor, beta0: float | Sequence[float] | Tensor,
                epsilon: float = SEED_EPSILON) -> Tensor:
    """:func:`seed_prior` on checked arguments."""
    return epsilon + torch.as_tensor(beta0, dtype=costs.dtype)[..., None] * (1 - costs)


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
