"""Doubly-reparameterised gradients of the importance-weighted bound (DReG).

Paper: Tucker, Lawson, Gu, Maddison (2019), *Doubly Reparameterized Gradient Estimators for
Monte Carlo Objectives*. **Biased** as an estimate of the ELBO gradient (it targets the
importance-weighted bound).
"""

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated

from bayes_router.inference.estimators._util import (
    attach_score_only_log_probs,
    importance_traces,
    is_reparameterised_site,
    path_log_prob,
    with_detached_values,
)
from bayes_router.inference.estimators.base import Estimator
from bayes_router.inference.estimators.iwae import (
    BoundSurrogateMixin,
    importance_plates,
    log_weight_term,
    particles_first,
)


def _kl_scale(guide_trace, scale: float) -> float:
    """The common factor ``lambda`` of the guide's log-densities in the log-weights (the KL
    scale: annealing or a KL weight), with the shared plates' subsampling factor divided out.

    :raises ValueError: if guide sites carry different factors (the doubly-reparameterised
        weights below need one ``lambda``).
    """
    factors = []
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            factor = torch.as_tensor(site["scale"])
            if factor.numel() != 1:
                raise ValueError(f"DReG needs one scale per guide site; site {name!r} has "
                                 f"{factor.numel()}")
            factors.append(float(factor) / scale)
    if not factors:
        return 1.0
    if max(factors) - min(factors) > 1e-9 * max(1.0, abs(max(factors))):
        raise ValueError(f"DReG needs the same KL scale on every guide site, got {factors}")
    return factors[0]


class DReG_ELBO(BoundSurrogateMixin, ELBO):
    """The importance-weighted bound with the doubly-reparameterised gradient estimator.

    With self-normalised weights ``wt_k = w_k / sum_j w_j`` of ``log w_k = log p(y | z_k) +
    lambda (log p(z_k) - log q(z_k))`` (``lambda``: the KL scale, 1 for the bound itself) and
    ``c_k = (1 - lambda) wt_k + lambda wt_k^2``, the surrogate is::

        sum_k sg(c_k) [log p(x, z_k) - log q_path(z_k)] + sum_k sg(wt_k - c_k) log p(x, sg(z_k))

    where ``log q_path`` carries only the path derivative of ``log q`` (through every sample,
    including a later site's dependence on earlier samples; see
    :func:`~bayes_router.inference.estimators._util.attach_score_only_log_probs`) and
    ``sg(z_k)`` a detached sample. The IWAE gradient's score term is ``-lambda sum_k wt_k
    d log q(z_k) / dphi`` at fixed samples; reparameterising ``E[wt_k d log q(z_k) / dphi] =
    E[d wt_k / dz_k dz_k / dphi]`` with ``d wt_k / d log w_k = wt_k - wt_k^2`` turns it into
    ``-lambda (wt_k - wt_k^2)`` times the path derivative of ``log w_k``, hence ``c_k``: the
    first sum gives the guide parameters ``sum_k c_k d log w_k / dz_k dz_k / dphi`` (no score
    terms; ``c_k = wt_k^2`` at ``lambda = 1``); model parameters receive ``c_k + (wt_k - c_k)
    = wt_k`` times ``grad log p``, the ordinary IWAE gradient. The second sum needs the model
    replayed against the detached guide trace (a memoising pair reuses the guide replay that
    computes the score-only term). As in
    :class:`~bayes_router.inference.estimators.iwae.IWAE_ELBO`, log-weights are formed per
    element of the plates that every site shares, and a subsampled shared plate's factor scales
    the bound, not the log-weights. All guide sites must be reparameterised.
    :meth:`loss_and_surrogate` exposes the bound and the surrogate to the training loop.

    :param int num_particles: number of importance samples, at least 2.
    """

    def __init__(self, num_particles: int = 2, max_plate_nesting=float("inf"),
                 vectorize_particles: bool = True, strict_enumeration_warning: bool = True):
        if num_particles < 2:
            raise ValueError(f"DReG does not apply with num_particles={num_particles}: the "
                             "importance-weighted bound needs num_particles >= 2")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=vectorize_particles,
                         strict_enumeration_warning=strict_enumeration_warning)

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace, full_guide_trace = importance_traces(
            model, guide, args, kwargs, self.max_plate_nesting)
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not is_reparameterised_site(site):
                raise ValueError(f"DReG does not apply to the guide site {name!r} "
                                 f"({type(site['fn']).__name__}): it needs fully "
                                 "reparameterised sites (no score-function part)")
        frozen = attach_score_only_log_probs(guide, guide_trace, args, kwargs,
                                             frozen=with_detached_values(full_guide_trace))
        frozen_model_trace = prune_subsample_sites(poutine.trace(
            poutine.replay(model, trace=frozen)).get_trace(*args, **kwargs))
        frozen_model_trace.compute_log_prob()
        return model_trace, guide_trace, frozen_model_trace

    def _particle_terms(self, model_trace, guide_trace, frozen_model_trace):
        """Log-weights (detached), path log-weights, ``log p(x, sg(z))``, the subsampling
        factor of one trace (see :func:`.iwae.importance_plates`) and the KL scale."""
        sum_dims, scale = importance_plates(model_trace)
        log_weight, path_log_weight, frozen_log_joint = 0.0, 0.0, 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                log_prob = log_weight_term(site["log_prob"], sum_dims, scale)
                log_weight = log_weight + log_prob.detach()
                path_log_weight = path_log_weight + log_prob
        for site in frozen_model_trace.nodes.values():
            if site["type"] == "sample":
                frozen_log_joint = frozen_log_joint + log_weight_term(site["log_prob"], sum_dims,
                                                                      scale)
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                log_weight = log_weight - log_weight_term(site["log_prob"], sum_dims,
                                                          scale).detach()
                path_log_weight = path_log_weight - log_weight_term(path_log_prob(site),
                                                                    sum_dims, scale)
        return log_weight, path_log_weight, frozen_log_joint, scale, _kl_scale(guide_trace, scale)

    def _bound_and_surrogate(self, model, guide, args, kwargs):
        terms = [self._particle_terms(*traces)
                 for traces in self._get_traces(model, guide, args, kwargs)]
        scale, kl_scale = terms[0][3], terms[0][4]
        if self.vectorize_particles:
            log_weight, path_log_weight, frozen_log_joint = (
                particles_first(terms[0][i], self.num_particles, self.max_plate_nesting)
                for i in range(3))
        else:
            log_weight, path_log_weight, frozen_log_joint = (
                torch.stack(torch.broadcast_tensors(*(torch.as_tensor(t[i]) for t in terms)))
                for i in range(3))
        weight = torch.softmax(log_weight, dim=0)  # (num_particles, ...) normalised weights
        bound = scale * (torch.logsumexp(log_weight, dim=0) - math.log(self.num_particles)).sum()
        path_weight = (1.0 - kl_scale) * weight + kl_scale * weight**2
        surrogate = scale * ((path_weight * path_log_weight).sum()
                             + ((weight - path_weight) * frozen_log_joint).sum())
        return bound, surrogate


class DReG(Estimator):
    """Doubly-reparameterised gradients for the importance-weighted bound.

    Tucker et al. rewrite the score term of the IWAE gradient for the guide parameters by a
    second reparameterisation, giving ``sum_k wt_k^2 d log w_k / dz_k dz_k / dphi`` with the
    guide's parameters held fixed inside ``log w_k``. Its signal-to-noise ratio does not
    decay with the number of particles, and at the exact posterior its variance vanishes.
    The guide uses ``torch``'s implicitly reparameterised Dirichlet; see :class:`DReG_ELBO`.

    .. warning:: Unbiased for the gradient of the importance-weighted bound, hence **biased**
        as an estimator of the ELBO gradient. Does not apply with fewer than two particles
        or to non-reparameterised guide sites (``ValueError``).

    References

    [1] `Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives`,
        George Tucker, Dieterich Lawson, Shixiang Gu, Chris J. Maddison (ICLR 2019)

    [2] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov
        (ICLR 2016)
    """

    name = "dreg"
    unbiased = False
    reference = ("Tucker, Lawson, Gu, Maddison (2019), Doubly Reparameterized Gradient "
                 "Estimators for Monte Carlo Objectives")
    min_particles = 2

    def make_elbo(self, num_particles: int = 2, vectorize_particles: bool = True,
                  **kwargs) -> DReG_ELBO:
        return DReG_ELBO(num_particles=self.check_num_particles(num_particles),
                         vectorize_particles=vectorize_particles, **kwargs)
