"""Private helpers shared by the estimators: unwrapping and detaching distributions."""

from __future__ import annotations

import copy

import pyro.distributions as dist
import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.distributions.util import sum_rightmost
from torch.distributions import Distribution


def unwrap_independent(fn: Distribution) -> tuple[Distribution, int]:
    """Strip :class:`~torch.distributions.Independent` wrappers.

    :returns: the innermost distribution and the total number of reinterpreted batch dims.
    """
    ndims = 0
    while isinstance(fn, torch.distributions.Independent):
        ndims += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, ndims


def detach_parameters(fn: Distribution) -> Distribution:
    """A shallow copy of ``fn`` whose parameter tensors are detached.

    ``detach_parameters(fn).log_prob(z)`` keeps the gradient path through the value ``z`` but
    none through the parameters of ``fn``: the path-derivative term of ``log q(z)``. Wrappers
    (``Independent``, masked or expanded distributions) are copied recursively.
    """
    new = copy.copy(fn)
    for key, value in vars(fn).items():
        if torch.is_tensor(value):
            new.__dict__[key] = value.detach()
        elif isinstance(value, Distribution):
            new.__dict__[key] = detach_parameters(value)
    return new


def to_event_keeping_score_parts(fn: Distribution, reinterpreted_batch_ndims: int | None = None
                                 ) -> Distribution:
    """``fn.to_event(n)``, wrapped in :class:`ScorePartsIndependent` rather than ``Independent``."""
    result = TorchDistributionMixin.to_event(fn, reinterpreted_batch_ndims)
    if isinstance(result, torch.distributions.Independent):
        return ScorePartsIndependent(result.base_dist, result.reinterpreted_batch_ndims)
    return result


class ScorePartsIndependent(dist.Independent):
    """An ``Independent`` that forwards ``score_parts`` to its base distribution.

    Pyro's ``Independent`` computes score parts from its ``log_prob`` and ``has_rsample``, which
    loses a partially reparameterised base's score-function term; this subclass sums the
    base's three parts over the reinterpreted dimensions instead.
    """

    def to_event(self, reinterpreted_batch_ndims=None):
        return to_event_keeping_score_parts(self, reinterpreted_batch_ndims)

    def score_parts(self, value):
        log_prob, score_function, entropy_term = self.base_dist.score_parts(value)
        n = self.reinterpreted_batch_ndims
        return ScoreParts(
            sum_rightmost(log_prob, n),
            sum_rightmost(score_function, n) if torch.is_tensor(score_function)
            else score_function,
            sum_rightmost(entropy_term, n) if torch.is_tensor(entropy_term) else entropy_term,
        )
