"""Reparameterisation through the Marsaglia-Tsang rejection sampler with shape augmentation.

Paper: Naesseth, Ruiz, Linderman, Blei (2017), *Reparameterization Gradients through
Acceptance-Rejection Sampling Algorithms*. Unbiased with the correction term (the default);
**biased** with ``score_correction=False``.
"""

from __future__ import annotations

import logging

import pyro.distributions as dist
import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.infer import Trace_ELBO
from torch import Tensor

from bayes_router.inference.estimators._util import to_event_keeping_score_parts
from bayes_router.inference.estimators.base import Estimator

logger = logging.getLogger(__name__)

_MAX_REJECTION_ROUNDS = 200


def _marsaglia_tsang_epsilon(shape: Tensor) -> Tensor:
    """Accepted proposal noise ``eps`` of the Marsaglia-Tsang sampler of ``Gamma(shape, 1)``.

    All entries are sampled together; each round redraws only the still-rejected ones. For
    ``shape >= 1`` a proposal is accepted with probability above 0.95, so a few rounds do.

    :param shape: Gamma shapes, all ``>= 1`` (no gradient is taken).
    :raises RuntimeError: if some entry is still rejected after the bounded number of rounds
        (non-finite shapes).
    """
    with torch.no_grad():
        d = shape - 1.0 / 3.0
        c = torch.rsqrt(9.0 * d)
        eps = torch.zeros_like(shape)
        pending = torch.ones_like(shape, dtype=torch.bool)
        tiny = torch.finfo(shape.dtype).tiny
        for _ in range(_MAX_REJECTION_ROUNDS):
            proposal = torch.randn_like(shape)
            v = (1.0 + c * proposal) ** 3
            log_u = torch.rand_like(shape).clamp_min(tiny).log()
            log_ratio = 0.5 * proposal**2 + d - d * v + d * v.clamp_min(tiny).log()
            accept = pending & (v > 0) & (log_u < log_ratio)
            eps = torch.where(accept, proposal, eps)
            pending = pending & ~accept
            if not bool(pending.any()):
                return eps
    raise RuntimeError(
        f"the Marsaglia-Tsang sampler rejected {int(pending.sum())} proposals in "
        f"{_MAX_REJECTION_ROUNDS} rounds; are the Dirichlet concentrations finite?"
    )


def _proposal_map(eps: Tensor, shape: Tensor) -> Tensor:
    """``h(eps, shape) = (shape - 1/3) (1 + eps / sqrt(9 shape - 3))^3``, a ``Gamma`` draw."""
    d = shape - 1.0 / 3.0
    return d * (1.0 + eps * torch.rsqrt(9.0 * d)) ** 3


def _log_accepted_density(eps: Tensor, shape: Tensor) -> Tensor:
    """Log-density of the accepted ``eps``: ``log Gamma(h(eps); shape) + log |dh/deps|``."""
    d = shape - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    h = _proposal_map(eps, shape)
    return ((shape - 1.0) * h.log() - h - torch.lgamma(shape)
            + 0.5 * d.log() + 2.0 * torch.log1p(c * eps))


class RSVIDirichlet(dist.Dirichlet):
    """A Dirichlet reparameterised through a shape-augmented Marsaglia-Tsang Gamma sampler.

    Each component draws ``g_k = h(eps_k, a_k + B) * prod_{i<B} u_ik^(1 / (a_k + i))`` with
    ``eps_k`` the accepted proposal of the Gamma(``a_k + B``) rejection sampler and ``u_ik``
    uniform, and returns ``g / sum(g)`` (computed as a softmax of ``log g``, so small
    concentrations cannot underflow). ``eps`` and ``u`` are held fixed, so gradients flow
    through ``h`` and the exponents.

    With ``score_correction`` the accepted ``eps`` are cached with the sample and
    :meth:`score_parts` returns ``log pi(eps; a + B)`` as the score-function part: an
    inference engine that honours score parts (``Trace_ELBO``) then adds RSVI's correction
    term ``f * grad log pi`` and the estimator is unbiased. ``.to_event`` keeps this.

    :param concentration: ``(..., K)`` positive concentration.
    :param int boost: shape augmentation ``B >= 1``.
    :param bool score_correction: include the correction term.
    """

    def __init__(self, concentration: Tensor, boost: int = 5, score_correction: bool = True,
                 validate_args=None):
        if isinstance(boost, bool) or not isinstance(boost, int) or boost < 1:
            raise ValueError(f"boost must be an int >= 1, got {boost!r}")
        self.boost = boost
        self.score_correction = bool(score_correction)
        self._accepted = None
        super().__init__(concentration, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(RSVIDirichlet, _instance)
        new.boost, new.score_correction, new._accepted = self.boost, self.score_correction, None
        return super().expand(batch_shape, _instance=new)

    def to_event(self, reinterpreted_batch_ndims=None):
        return to_event_keeping_score_parts(self, reinterpreted_batch_ndims)

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(sample_shape)
        concentration = self.concentration.expand(shape)
        boosted = concentration + self.boost
        eps = _marsaglia_tsang_epsilon(boosted.detach())
        offsets = torch.arange(self.boost, dtype=concentration.dtype,
                               device=concentration.device).reshape((-1,) + (1,) * len(shape))
        tiny = torch.finfo(concentration.dtype).tiny
        log_u = torch.rand((self.boost,) + shape, dtype=concentration.dtype,
                           device=concentration.device).clamp_min(tiny).log()
        log_gamma = _proposal_map(eps, boosted).log() + (log_u / (concentration + offsets)).sum(0)
        value = torch.softmax(log_gamma, -1).clamp_min(tiny)
        self._accepted = (value, eps)
        return value

    def score_parts(self, value):
        log_prob = self.log_prob(value)
        score_function = 0
        if self.score_correction:
            if self._accepted is not None and self._accepted[0] is value:
                eps = self._accepted[1]
                boosted = self.concentration + self.boost
                score_function = _log_accepted_density(eps, boosted).sum(-1)
            else:
                logger.warning("RSVI score correction skipped: the value was not sampled by this "
                               "distribution, so its accepted proposals are unknown")
        return ScoreParts(log_prob=log_prob, score_function=score_function,
                          entropy_term=log_prob)


class RSVI(Estimator):
    """Rejection-sampling variational inference for the Dirichlet (via Gammas).

    The guide uses :class:`RSVIDirichlet`. Its gradient is the RSVI gradient of Naesseth et
    al.: a reparameterisation term through the accepted proposal ``h(eps, a + B)`` (``eps``
    fixed) and, with ``score_correction=True`` (the default), the correction term
    ``E[f(z) grad log pi(eps; a + B)]`` added by :class:`~pyro.infer.Trace_ELBO` as a
    score-function term with the plate-restricted ELBO integrand as ``f``. The shape
    augmentation by ``B`` makes ``pi`` close to a standard normal, so the correction is small
    and its variance low; the ``u^(1/(a+i))`` factors are an exact reparameterisation.

    .. warning:: With ``score_correction=False`` the correction term is omitted, as is common
        in practice, and the estimator is **biased** (the bias shrinks as ``boost`` grows).
        With the correction it is unbiased under ``Trace_ELBO`` only: ``TraceGraph_ELBO`` and
        ``TraceMeanField_ELBO`` ignore score parts of reparameterised sites.

    :param int boost: shape augmentation ``B``.
    :param bool score_correction: include the correction term.

    References

    [1] `Reparameterization Gradients through Acceptance-Rejection Sampling Algorithms`,
        Christian A. Naesseth, Francisco J. R. Ruiz, Scott W. Linderman, David M. Blei
        (AISTATS 2017)

    [2] `A Simple Method for Generating Gamma Variables`, George Marsaglia, Wai Wan Tsang
        (ACM TOMS 2000)
    """

    name = "rsvi"
    reference = ("Naesseth, Ruiz, Linderman, Blei (2017), Reparameterization Gradients through "
                 "Acceptance-Rejection Sampling Algorithms")

    def __init__(self, boost: int = 5, score_correction: bool = True):
        if isinstance(boost, bool) or not isinstance(boost, int) or boost < 1:
            raise ValueError(f"boost must be an int >= 1, got {boost!r}")
        self.boost = boost
        self.score_correction = bool(score_correction)
        self.unbiased = self.score_correction

    def family(self, concentration: Tensor) -> RSVIDirichlet:
        return RSVIDirichlet(concentration, boost=self.boost,
                             score_correction=self.score_correction)

    def make_elbo(self, num_particles: int = 1, vectorize_particles: bool = True,
                  **kwargs) -> Trace_ELBO:
        return Trace_ELBO(num_particles=self.check_num_particles(num_particles),
                          vectorize_particles=vectorize_particles, **kwargs)
