"""Reparameterised gradients with a Monte-Carlo KL term (:class:`~pyro.infer.Trace_ELBO`).

Paper: Figurnov, Mohamed, Mnih (2018), *Implicit Reparameterization Gradients*. Unbiased.
"""

from __future__ import annotations

from pyro.infer import Trace_ELBO

from bayes_router.inference.estimators.base import Estimator


class ReparamMC(Estimator):
    """Pathwise gradient through ``torch``'s Dirichlet ``rsample``, KL term by Monte Carlo.

    The guide samples ``alpha ~ Dir(a)`` with :meth:`torch.distributions.Dirichlet.rsample`,
    whose gradient ``d alpha / d a`` is the *implicit* reparameterisation gradient (obtained by
    differentiating the CDF, not by inverting it) [1, 2]. The whole ELBO integrand
    ``log p(x, alpha) - log q(alpha)`` is then differentiated along the sample path by
    :class:`~pyro.infer.Trace_ELBO`, so the KL term is estimated from the same samples as the
    likelihood. Unbiased.

    References

    [1] `Implicit Reparameterization Gradients`,
        Mikhail Figurnov, Shakir Mohamed, Andriy Mnih (NeurIPS 2018)

    [2] `Pathwise Derivatives Beyond the Reparameterization Trick`,
        Martin Jankowiak, Fritz Obermeyer (ICML 2018)
    """

    name = "reparam-mc"
    unbiased = True
    reference = ("Figurnov, Mohamed, Mnih (2018), Implicit Reparameterization Gradients; "
                 "Jankowiak, Obermeyer (2018), Pathwise Derivatives Beyond the "
                 "Reparameterization Trick")

    def make_elbo(self, num_particles: int = 1, vectorize_particles: bool = True,
                  **kwargs) -> Trace_ELBO:
        return Trace_ELBO(num_particles=self.check_num_particles(num_particles),
                          vectorize_particles=vectorize_particles, **kwargs)
