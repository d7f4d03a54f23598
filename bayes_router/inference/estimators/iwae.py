"""The importance-weighted bound and its standard gradient (``RenyiELBO`` with ``alpha = 0``).

Paper: Burda, Grosse, Salakhutdinov (2016), *Importance Weighted Autoencoders*. **Biased** as
an estimate of the ELBO gradient (it targets the tighter importance-weighted bound).
"""

from __future__ import annotations

import math

import torch
from pyro.infer import RenyiELBO
from pyro.infer.util import torch_item
from pyro.util import warn_if_nan
from torch import Tensor

from bayes_router.inference.estimators.base import Estimator


def importance_plates(model_trace) -> tuple[list[int], float]:
    """How the sites of one trace combine into per-element importance log-weights.

    Log-weights are formed per element of the plates that *every* sample site shares (the
    ``batch`` plate, and the vectorised-particle plate); the dims of the other plates are summed
    inside each log-weight. A subsampled shared plate scales every site's ``log_prob`` by
    ``full_size / size``; that factor must multiply the *bound* (an estimate of a sum over the
    plate's elements), not the log-weights inside the ``logsumexp``, where it would temper the
    weights (with ``N / B`` in the hundreds, every weight but the largest vanishes).

    :returns: the dims to sum inside a log-weight, and the subsampling factor of the shared
        plates (1 when nothing is subsampled).
    """
    stacks = [set(site["cond_indep_stack"]) for site in model_trace.nodes.values()
              if site["type"] == "sample"]
    frames = set().union(*stacks) if stacks else set()
    shared = frames.intersection(*stacks) if stacks else set()
    sum_dims = sorted(f.dim for f in frames - shared if f.dim is not None)
    scale = 1.0
    for frame in shared:
        if frame.full_size is not None and frame.size:
            scale *= float(frame.full_size) / float(frame.size)
    return sum_dims, scale


def log_weight_term(log_prob: Tensor, sum_dims: list[int], scale: float) -> Tensor:
    """One site's contribution to the log-weights: ``log_prob`` summed over ``sum_dims`` (kept as
    size-1 dims), with the shared plates' subsampling factor ``scale`` divided out."""
    dims = [d for d in sum_dims if -d <= log_prob.dim()]
    if dims:
        log_prob = log_prob.sum(dims, keepdim=True)
    return log_prob / scale


def particles_first(value, num_particles: int, max_plate_nesting: int) -> Tensor:
    """A vectorised log-weight with the particle dimension first and expanded: ``(N, ...)``.

    :param max_plate_nesting: the vectorised ELBO's ``max_plate_nesting``, which counts the
        particle plate (Pyro puts it at ``dim = -max_plate_nesting``).
    """
    value = torch.as_tensor(value)
    while value.dim() < max_plate_nesting:
        value = value.unsqueeze(0)
    return value.expand((num_particles,) + tuple(value.shape[1:]))


class BoundSurrogateMixin:
    """The ELBO entry points of an importance-weighted objective, given
    ``_bound_and_surrogate(model, guide, args, kwargs) -> (bound, surrogate)``: the bound's
    value and a surrogate whose gradient is the estimator's."""

    def loss_and_surrogate(self, model, guide, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Minus the bound (detached) and a surrogate loss carrying the estimator's gradient."""
        bound, surrogate = self._bound_and_surrogate(model, guide, args, kwargs)
        return -bound.detach(), -surrogate

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs):
        """:returns: minus a Monte-Carlo estimate of the importance-weighted bound (a float)."""
        bound, _ = self._bound_and_surrogate(model, guide, args, kwargs)
        loss = -torch_item(bound)
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """Minus the bound in value, carrying the estimator's gradient."""
        bound, surrogate = self._bound_and_surrogate(model, guide, args, kwargs)
        loss = -bound.detach() + (surrogate.detach() - surrogate)
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """Minus the bound (a float); accumulates the estimator's gradient into ``.grad``."""
        bound, surrogate = self._bound_and_surrogate(model, guide, args, kwargs)
        if getattr(surrogate, "requires_grad", False):
            (-surrogate).backward(retain_graph=self.retain_graph)
        loss = -torch_item(bound)
        warn_if_nan(loss, "loss")
        return loss


class IWAE_ELBO(BoundSurrogateMixin, RenyiELBO):
    """The ``N``-particle importance-weighted bound ``E[log mean_k w_k]`` with its IWAE gradient.

    ``RenyiELBO`` with ``alpha = 0``, whose surrogate is also exposed through
    :meth:`loss_and_surrogate` (the training loop and the gradient-variance lab differentiate it
    themselves). For each element of the shared plates, with ``log w_k = log p(x, z_k) -
    log q(z_k)`` and self-normalised weights ``wt_k = softmax_k(log w_k)``::

        bound     = scale * sum_elements (logsumexp_k log w_k - log N)
        surrogate = scale * sum_elements sum_k sg(wt_k) log w_k

    whose gradient is the gradient of ``bound`` when every guide site is reparameterised.
    Unlike ``RenyiELBO``, the subsampling factor ``scale`` of a subsampled shared plate is
    applied to the bound instead of inside the log-weights (see :func:`importance_plates`).

    :param int num_particles: number of importance samples, at least 2.
    :raises ValueError: with fewer than two particles, or (when the loss is computed) for a guide
        site that is not reparameterised.
    """

    def __init__(self, num_particles: int = 2, max_plate_nesting=float("inf"),
                 vectorize_particles: bool = True, strict_enumeration_warning: bool = True):
        if num_particles < 2:
            raise ValueError(f"IWAE does not apply with num_particles={num_particles}: the "
                             "importance-weighted bound needs num_particles >= 2")
        super().__init__(alpha=0, num_particles=num_particles,
                         max_plate_nesting=max_plate_nesting,
                         vectorize_particles=vectorize_particles,
                         strict_enumeration_warning=strict_enumeration_warning)

    def _particle_terms(self, model_trace, guide_trace) -> tuple[Tensor, Tensor, float]:
        """Detached log-weights, differentiable log-weights and the subsampling factor."""
        sum_dims, scale = importance_plates(model_trace)
        log_weight, surrogate_log_weight = 0.0, 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                term = log_weight_term(site["log_prob"], sum_dims, scale)
                log_weight = log_weight + term.detach()
                surrogate_log_weight = surrogate_log_weight + term
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if not site["fn"].has_rsample:
                raise ValueError(f"IWAE does not apply to the non-reparameterised guide site "
                                 f"{name!r} ({type(site['fn']).__name__})")
            term = log_weight_term(site["log_prob"], sum_dims, scale)
            log_weight = log_weight - term.detach()
            surrogate_log_weight = surrogate_log_weight - term
        return log_weight, surrogate_log_weight, scale

    def _bound_and_surrogate(self, model, guide, args, kwargs) -> tuple[Tensor, Tensor]:
        terms = [self._particle_terms(*traces)
                 for traces in self._get_traces(model, guide, args, kwargs)]
        scale = terms[0][2]
        if self.vectorize_particles:
            log_weight, surrogate_log_weight = (
                particles_first(terms[0][i], self.num_particles, self.max_plate_nesting)
                for i in range(2))
        else:
            log_weight, surrogate_log_weight = (
                torch.stack(torch.broadcast_tensors(*(torch.as_tensor(t[i]) for t in terms)))
                for i in range(2))
        weight = torch.softmax(log_weight, dim=0)  # (num_particles, ...) normalised weights
        bound = scale * (torch.logsumexp(log_weight, dim=0) - math.log(self.num_particles)).sum()
        surrogate = scale * (weight * surrogate_log_weight).sum()
        return bound, surrogate


class IWAE(Estimator):
    """Gradient of the ``N``-particle importance-weighted bound ``E[log mean_k w_k]``.

    ``w_k = p(x, z_k) / q(z_k)`` with ``z_k`` drawn by ``torch``'s implicitly reparameterised
    Dirichlet sampler; :class:`IWAE_ELBO` (``RenyiELBO`` with ``alpha = 0``) differentiates
    ``log mean_k w_k`` (self-normalised weights times the total derivative of each
    ``log w_k``). The log-weights are formed per element of the plates every site shares, as
    ``RenyiELBO`` does, but without the subsampling scale inside them. Needs
    ``num_particles >= 2`` (one particle is the ELBO itself).

    .. warning:: The estimator is unbiased for the gradient of the importance-weighted bound,
        which is tighter than the ELBO, so it is **biased** as an estimator of the ELBO
        gradient; the bias shrinks as the guide approaches the posterior. Its signal-to-noise
        ratio for the guide parameters also falls as ``num_particles`` grows [2]: see ``dreg``.

    References

    [1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov
        (ICLR 2016)

    [2] `Tighter Variational Bounds are Not Necessarily Better`, Tom Rainforth, Adam R.
        Kosiorek, Tuan Anh Le, Chris J. Maddison, Maximilian Igl, Frank Wood, Yee Whye Teh
        (ICML 2018)
    """

    name = "iwae"
    unbiased = False
    reference = ("Burda, Grosse, Salakhutdinov (2016), Importance Weighted Autoencoders")
    min_particles = 2

    def make_elbo(self, num_particles: int = 2, vectorize_particles: bool = True,
                  **kwargs) -> IWAE_ELBO:
        return IWAE_ELBO(num_particles=self.check_num_particles(num_particles),
                         vectorize_particles=vectorize_particles, **kwargs)
