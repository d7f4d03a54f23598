"""Private helpers shared by the estimators: unwrapping distributions, score parts through
``.to_event``, and the score-only log-densities that path-derivative estimators subtract."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.distributions.util import is_identically_zero, sum_rightmost
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape
from torch.distributions import Distribution
from torch.distributions.kl import _dispatch_kl  # the registry kl_divergence itself consults


def unwrap_independent(fn: Distribution) -> tuple[Distribution, int]:
    """Strip :class:`~torch.distributions.Independent` wrappers.

    :returns: the innermost distribution and the total number of reinterpreted batch dims.
    """
    ndims = 0
    while isinstance(fn, torch.distributions.Independent):
        ndims += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, ndims


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


def has_analytic_kl(q: Distribution, p: Distribution) -> bool:
    """Whether ``kl_divergence(q, p)`` has a closed form, by the rules it dispatches with:
    Pyro's ``(Independent, Independent)`` rule strips the ``.to_event`` dimensions the two
    share, and torch's registry takes the rest. Conservative: where the two wrap differently
    (a ``.to_event`` on one side only) it answers ``False``, and the caller computes the
    log-densities a Monte-Carlo fallback would need."""
    while isinstance(q, torch.distributions.Independent) and isinstance(
            p, torch.distributions.Independent):
        if q.reinterpreted_batch_ndims != p.reinterpreted_batch_ndims:
            return False
        q, p = q.base_dist, p.base_dist
    if isinstance(q, torch.distributions.Independent) or isinstance(
            p, torch.distributions.Independent):
        return False
    return _dispatch_kl(type(q), type(p)) is not NotImplemented


def importance_traces(model, guide, args, kwargs, max_plate_nesting, analytic_kl: bool = False):
    """As Pyro's ``get_importance_trace`` for a callable guide: the pruned model and guide
    traces (log-probs and score parts computed), plus the guide trace *before* pruning. Replays
    must use the unpruned one: it holds the plates' subsample indices, without which a plate
    with ``subsample_size`` draws fresh rows on replay.

    :param analytic_kl: leave out the log-densities of the latent sites whose KL has a closed
        form (the analytic-KL ELBO never reads them): on the routing model that is four
        Dirichlet log-densities per step, a few ms at the Phase-1 size.
    """
    full_guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=full_guide_trace)).get_trace(
        *args, **kwargs)
    if is_validation_enabled():
        check_model_guide_match(model_trace, full_guide_trace, max_plate_nesting)
    guide_trace = prune_subsample_sites(full_guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    closed_form = set()
    if analytic_kl:
        closed_form = {name for name, site in model_trace.nodes.items()
                       if site["type"] == "sample" and not site["is_observed"]
                       and name in guide_trace.nodes
                       and guide_trace.nodes[name]["fn"].has_rsample
                       and not isinstance(guide_trace.nodes[name]["fn"], ScorePartsIndependent)
                       and has_analytic_kl(guide_trace.nodes[name]["fn"], site["fn"])}
        for name in closed_form:  # fully reparameterised: no score-function term, nothing else
            guide_trace.nodes[name]["score_parts"] = ScoreParts(None, 0, None)
    model_trace.compute_log_prob(site_filter=lambda name, site: name not in closed_form)
    guide_trace.compute_score_parts()  # skips the closed-form sites: they hold score parts
    if is_validation_enabled():
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    if "log_prob" not in site:  # the shape its log-density would have
                        site = {**site, "log_prob": torch.empty(site["fn"].batch_shape,
                                                                device="meta")}
                    check_site_shape(site, max_plate_nesting)
    return model_trace, guide_trace, full_guide_trace


def with_detached_values(trace):
    """A copy of ``trace`` whose sample values are detached (for replaying model or guide)."""
    frozen = trace.copy()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and torch.is_tensor(site["value"]):
            frozen.nodes[name] = {**site, "value": site["value"].detach()}
    return frozen


def is_reparameterised_site(site) -> bool:
    """A guide sample site whose gradient flows only through its value (no score part)."""
    _, score_function_term, entropy_term = site["score_parts"]
    return not is_identically_zero(entropy_term) and is_identically_zero(score_function_term)


def attach_score_only_log_probs(guide, guide_trace, args, kwargs, frozen):
    """Store ``log q(sg(z); phi)`` as ``site["score_only_log_prob"]`` on every reparameterised
    site of ``guide_trace`` (whose score parts must be computed).

    ``log q`` of a site is a function of the parameters *and* of the samples of earlier sites
    (an autoregressive guide: layer ``l``'s concentration depends on the samples below it). Its
    total derivative splits into the score term, the derivative at fixed samples, and the path
    term through every sample. The score term is the gradient of ``log q`` with all samples
    detached, which replaying the guide on detached values gives; ``log q - score_only +
    sg(score_only)`` then carries exactly the path term. Detaching a site's distribution
    parameters instead would also cut ``d log q(z_l | z_<l) / d z_<l``, a part of the path
    term (the bias this replaces).

    :param guide: the guide exactly as traced (the vectorised wrapper, if any).
    :param frozen: the detached-value copy of the *unpruned* guide trace to replay on (see
        :func:`importance_traces`; pass the one a model is replayed on next, so a memoising
        model/guide pair reuses the guide's forward pass).
    :returns: ``frozen``.
    """
    replayed = prune_subsample_sites(
        poutine.trace(poutine.replay(guide, trace=frozen)).get_trace(*args, **kwargs))
    replayed.compute_log_prob()
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and is_reparameterised_site(site):
            site["score_only_log_prob"] = replayed.nodes[name]["log_prob"]
    return frozen


def path_log_prob(site) -> torch.Tensor:
    """The site's scaled ``log q(z)`` in value, carrying only the path derivative (see
    :func:`attach_score_only_log_probs`)."""
    score_only = site["score_only_log_prob"]
    return site["log_prob"] - score_only + score_only.detach()
