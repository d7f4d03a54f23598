"""Dirichlet samples as normalised Gamma samples, differentiated through ``Gamma.rsample``.

Paper: Figurnov, Mohamed, Mnih (2018), *Implicit Reparameterization Gradients* (Gamma).
Unbiased.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from torch import Tensor

from bayes_router.inference.estimators.base import Estimator


class NormalisedGammaDirichlet(dist.Dirichlet):
    """A Dirichlet whose ``rsample`` draws ``g_k ~ Gamma(a_k, 1)`` and returns ``g / sum(g)``.

    ``torch``'s ``Gamma.rsample`` carries the implicit reparameterisation gradient of each
    Gamma draw, and the normalisation is differentiated by autograd, so the gradient is the
    pathwise one of the *composed* sampler rather than ``torch``'s fused Dirichlet gradient.
    Gamma draws that underflow (shapes well below 1) are clamped to the smallest normal
    number of the dtype before normalising, as ``torch``'s own Dirichlet sampler does.
    """

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(sample_shape)
        concentration = self.concentration.expand(shape)
        gamma = torch.distributions.Gamma(concentration, torch.ones_like(concentration))
        draws = gamma.rsample().clamp_min(torch.finfo(concentration.dtype).tiny)
        return draws / draws.sum(-1, keepdim=True)


class NaiveGamma(Estimator):
    """Pathwise gradient through the normalised-Gamma construction of the Dirichlet.

    Everything else as ``reparam-mc`` (:class:`~pyro.infer.Trace_ELBO`, Monte-Carlo KL).
    Unbiased: the Gamma implicit gradient is exact and normalisation is a smooth map.

    References

    [1] `Implicit Reparameterization Gradients`,
        Mikhail Figurnov, Shakir Mohamed, Andriy Mnih (NeurIPS 2018)

    [2] `Pathwise Derivatives Beyond the Reparameterization Trick`,
        Martin Jankowiak, Fritz Obermeyer (ICML 2018)
    """

    name = "naive-gamma"
    unbiased = True
    reference = ("Figurnov, Mohamed, Mnih (2018), Implicit Reparameterization Gradients "
                 "(Gamma); Dirichlet as normalised Gammas")

    def family(self, concentration: Tensor) -> NormalisedGammaDirichlet:
        return NormalisedGammaDirichlet(concentration)

    def make_elbo(self, num_particles: int = 1, vectorize_particles: bool = True,
                  **kwargs) -> Trace_ELBO:
        return Trace_ELBO(num_particles=self.check_num_particles(num_particles),
                          vectorize_particles=vectorize_particles, **kwargs)
