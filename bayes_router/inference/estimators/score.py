"""Score-function (REINFORCE) gradients: reparameterisation switched off for the Dirichlet.

Paper: Ranganath, Gerrish, Blei (2014), *Black Box Variational Inference*. Unbiased.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from torch import Tensor

from bayes_router.inference.estimators.base import Estimator


class ScoreFunctionDirichlet(dist.Dirichlet):
    """A Dirichlet that declares itself non-reparameterisable.

    ``has_rsample = False`` makes ``pyro.sample`` call :meth:`sample` (drawn under
    ``torch.no_grad``, so the value carries no gradient), and Pyro's default ``score_parts``
    then returns ``(log_prob, score_function=log_prob, entropy_term=0)``: inference engines
    differentiate ``log q(alpha)`` only through its parameters, times the (detached) cost.
    """

    has_rsample = False

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return super().rsample(sample_shape).detach()


class ScoreFunction(Estimator):
    """The score-function estimator with Pyro's plate-level Rao-Blackwellisation.

    With a non-reparameterised guide site :class:`~pyro.infer.Trace_ELBO` builds the surrogate
    ``sum_sites log_r * log q(alpha)`` where ``log_r`` is the detached ELBO integrand restricted
    to the plates of the site, plus the model terms (``pyro/infer/trace_elbo.py``,
    ``_differentiable_loss_particle``). Unbiased, no baseline: the high-variance reference.

    References

    [1] `Black Box Variational Inference`,
        Rajesh Ranganath, Sean Gerrish, David M. Blei (AISTATS 2014)

    [2] `Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement
        Learning`, Ronald J. Williams (Machine Learning, 1992)
    """

    pathwise = False
    name = "score"
    unbiased = True
    reference = ("Ranganath, Gerrish, Blei (2014), Black Box Variational Inference; Williams "
                 "(1992), Simple Statistical Gradient-Following Algorithms")

    def family(self, concentration: Tensor) -> ScoreFunctionDirichlet:
        return ScoreFunctionDirichlet(concentration)

    def make_elbo(self, num_particles: int = 1, vectorize_particles: bool = True,
                  **kwargs) -> Trace_ELBO:
        return Trace_ELBO(num_particles=self.check_num_particles(num_particles),
                          vectorize_particles=vectorize_particles, **kwargs)
