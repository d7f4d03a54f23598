"""Sticking the landing: the path-derivative gradient estimator.

Paper: Roeder, Wu, Duvenaud (2017), *Sticking the Landing: Simple, Lower-Variance Gradient
Estimators for Variational Inference*. Unbiased for the ELBO (not for reweighted bounds).
"""

from __future__ import annotations

from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO

from bayes_router.inference.estimators._util import detach_parameters
from bayes_router.inference.estimators.base import Estimator


class TraceSTL_ELBO(Trace_ELBO):
    """``Trace_ELBO`` whose reparameterised guide sites contribute only their path derivative.

    The total derivative of ``log q_phi(z_phi)`` splits into a path term,
    ``d log q / dz * dz / dphi``, and a score term, ``d log q / dphi`` at fixed ``z``, whose
    expectation is zero. For every fully reparameterised guide site the surrogate uses
    ``log q`` evaluated at the sampled value with the distribution's parameters detached (a
    copy of the distribution, ``Independent`` and other wrappers included), so the gradient
    keeps the path through the value and drops the score term. The loss value is unchanged;
    non-reparameterised sites are handled as by ``Trace_ELBO``.
    """

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss, surrogate_loss = super()._differentiable_loss_particle(model_trace, guide_trace)
        for site in guide_trace.nodes.values():
            if site["type"] != "sample":
                continue
            _, score_function_term, entropy_term = site["score_parts"]
            if is_identically_zero(entropy_term) or not is_identically_zero(score_function_term):
                continue
            path_log_prob = detach_parameters(site["fn"]).log_prob(site["value"])
            path_log_prob = scale_and_mask(path_log_prob, site["scale"], site["mask"])
            surrogate_loss = surrogate_loss - (entropy_term - path_log_prob).sum()
        return loss, surrogate_loss


class StickingTheLanding(Estimator):
    """Reparameterised gradient with the guide's score term dropped.

    Uses ``torch``'s implicitly reparameterised Dirichlet sampler and
    :class:`TraceSTL_ELBO`. Unbiased, since the dropped term has expectation zero; its variance
    vanishes where the guide equals the exact posterior (then ``log p(x, z) - log q(z)`` is
    constant in ``z``), which is why it "sticks the landing".

    .. warning:: The dropped term is zero in expectation only for the ELBO itself. Combined with
        objectives that reweight samples (importance-weighted bounds) the estimator is biased;
        use ``dreg`` there.

    References

    [1] `Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
        Inference`, Geoffrey Roeder, Yuhuai Wu, David Duvenaud (NeurIPS 2017)
    """

    name = "stl"
    unbiased = True
    reference = ("Roeder, Wu, Duvenaud (2017), Sticking the Landing: Simple, Lower-Variance "
                 "Gradient Estimators for Variational Inference")

    def make_elbo(self, num_particles: int = 1, vectorize_particles: bool = True,
                  **kwargs) -> TraceSTL_ELBO:
        return TraceSTL_ELBO(num_particles=self.check_num_particles(num_particles),
                             vectorize_particles=vectorize_particles, **kwargs)
