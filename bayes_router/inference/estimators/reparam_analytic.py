"""Reparameterised likelihood gradient, analytic Dirichlet KL (``TraceMeanField_ELBO``).

Paper: Kingma, Welling (2014), *Auto-Encoding Variational Bayes* (analytic KL term).
Unbiased under the mean-field condition the routing model/guide pair meets.
"""

from __future__ import annotations

from pyro.infer import TraceMeanField_ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import is_validation_enabled
from pyro.util import check_if_enumerated

from bayes_router.inference.estimators._util import importance_traces
from bayes_router.inference.estimators.base import Estimator


class AnalyticKLELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` that computes only the log-densities its loss reads.

    Pyro's traces compute the log-density of every site, but wherever the KL has a closed form
    the mean-field ELBO reads the KL alone: the prior's and the guide's Dirichlet log-densities
    (four ``lgamma``-heavy evaluations per step on the two-layer routing model) are thrown away.
    This ELBO leaves them out; loss and gradients are the same numbers (tested against
    ``TraceMeanField_ELBO``).
    """

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace, _ = importance_traces(
            model, guide, args, kwargs, self.max_plate_nesting, analytic_kl=True)
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
            _check_mean_field_requirement(model_trace, guide_trace)
        return model_trace, guide_trace


class ReparamAnalytic(Estimator):
    """Pathwise likelihood gradient, closed-form ``KL(Dir(a) || Dir(beta0 pi))``.

    The guide samples with ``torch``'s implicitly reparameterised Dirichlet ``rsample`` (see
    :class:`~bayes_router.inference.estimators.reparam_mc.ReparamMC`), and
    :class:`~pyro.infer.TraceMeanField_ELBO` replaces the Monte-Carlo estimate of
    ``E_q[log p(alpha) - log q(alpha)]`` by ``-KL(q || p)`` wherever ``kl_divergence`` is
    registered. ``torch`` registers ``(Dirichlet, Dirichlet)``; Pyro registers
    ``(Independent, Independent)``, which unwraps ``.to_event(n)`` on both sides; ``torch``'s
    dispatch follows subclasses, so the Dirichlet subclasses of the other estimators are covered
    too. Only the likelihood term is estimated, so the variance is never larger than that of
    ``reparam-mc`` for the KL part. Unbiased under the mean-field condition (each guide site's
    model parents are not its guide descendants), which the routing model/guide pair meets.

    References

    [1] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (ICLR 2014)

    [2] `Implicit Reparameterization Gradients`,
        Mikhail Figurnov, Shakir Mohamed, Andriy Mnih (NeurIPS 2018)
    """

    name = "reparam-analytic"
    unbiased = True
    reference = ("Kingma, Welling (2014), Auto-Encoding Variational Bayes; Figurnov, Mohamed, "
                 "Mnih (2018), Implicit Reparameterization Gradients")

    def make_elbo(self, num_particles: int = 1, vectorize_particles: bool = True,
                  **kwargs) -> AnalyticKLELBO:
        return AnalyticKLELBO(num_particles=self.check_num_particles(num_particles),
                              vectorize_particles=vectorize_particles, **kwargs)
