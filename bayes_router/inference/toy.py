"""The conjugate Dirichlet-categorical toy, where the exact ELBO and its gradient are known.

Model and guide follow the routing model's site pattern (``pyro.plate("batch")``, the
routing-weight site ``alpha_0`` with the token dimension as an event dimension, the observed
site ``obs``)::

    model:  alpha ~ Dir(prior)                     # prior = beta0 * pi, (K,)
            obs_n ~ Categorical(alpha), n < N      # summarised by counts (K,)
    guide:  alpha ~ Dir(a)                         # a: a positive pyro.param

The guide is parameterised by the concentration ``a`` itself (Pyro optimises ``log a``
internally); gradients here are with respect to ``a``. With ``c = prior + counts`` and
``a0 = sum(a)``::

    ELBO(a) = sum_k (c_k - a_k)(psi(a_k) - psi(a0)) + log B(a) - log B(prior)
    dELBO/da_j = (c_j - a_j) psi'(a_j) - psi'(a0) sum_k (c_k - a_k)

where ``log B(a) = sum_k lgamma(a_k) - lgamma(a0)``. The maximiser is the exact posterior
``a = c``, where the ELBO equals the log evidence.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor
from torch.distributions import constraints

from bayes_router.inference.estimators import Estimator, get_estimator

TOY_CONCENTRATION = "toy_concentration"


def _check_toy(counts: Tensor, prior: Tensor) -> tuple[Tensor, Tensor]:
    counts, prior = torch.as_tensor(counts), torch.as_tensor(prior)
    if prior.dim() != 1 or prior.shape[0] < 2:
        raise ValueError(f"prior must have shape (K,) with K >= 2, got {tuple(prior.shape)}")
    if not bool(torch.isfinite(prior).all()) or not bool((prior > 0).all()):
        raise ValueError("prior must hold positive finite concentrations")
    if counts.shape != prior.shape:
        raise ValueError(f"counts must have shape {tuple(prior.shape)}, got "
                         f"{tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()) or bool(
            (counts != counts.round()).any()):
        raise ValueError("counts must be non-negative integers")
    return counts, prior


def _log_beta(concentration: Tensor) -> Tensor:
    return torch.lgamma(concentration).sum(-1) - torch.lgamma(concentration.sum(-1))


def toy_observations(counts: Tensor) -> Tensor:
    """The categorical observations ``(N,)`` (sorted category indices) that ``counts`` summarise."""
    counts = torch.as_tensor(counts)
    return torch.repeat_interleave(torch.arange(counts.shape[-1]), counts.round().long())


def toy_posterior(counts: Tensor, prior: Tensor) -> dist.Dirichlet:
    """The exact posterior ``Dir(prior + counts)``."""
    counts, prior = _check_toy(counts, prior)
    return dist.Dirichlet(prior + counts.to(prior.dtype))


def toy_elbo(a: Tensor, counts: Tensor, prior: Tensor) -> Tensor:
    """Exact ELBO of the guide ``Dir(a)`` (batched over the leading dims of ``a``)."""
    counts, prior = _check_toy(counts, prior)
    posterior = prior + counts.to(prior.dtype)
    a0 = a.sum(-1, keepdim=True)
    expected_log_alpha = torch.digamma(a) - torch.digamma(a0)
    return (((posterior - a) * expected_log_alpha).sum(-1) + _log_beta(a)
            - _log_beta(prior))


def toy_elbo_grad(a: Tensor, counts: Tensor, prior: Tensor) -> Tensor:
    """Exact gradient of :func:`toy_elbo` with respect to ``a``, shape of ``a``."""
    counts, prior = _check_toy(counts, prior)
    residual = prior + counts.to(prior.dtype) - a
    a0 = a.sum(-1, keepdim=True)
    return (residual * torch.polygamma(1, a)
            - torch.polygamma(1, a0) * residual.sum(-1, keepdim=True))


def toy_log_evidence(counts: Tensor, prior: Tensor) -> Tensor:
    """``log p(obs) = log B(prior + counts) - log B(prior)``, the ELBO at the optimum."""
    counts, prior = _check_toy(counts, prior)
    return _log_beta(prior + counts.to(prior.dtype)) - _log_beta(prior)


def toy_model(counts: Tensor, prior: Tensor, num_replicas: int = 1) -> None:
    """Pyro model: ``alpha_0 ~ Dir(prior)``, then ``N = sum(counts)`` categorical draws ``obs``.

    :param num_replicas: size of the ``batch`` plate: independent copies of the problem (the
        gradient lab uses them to draw many independent gradients in one pass).
    """
    counts, prior = _check_toy(counts, prior)
    obs = toy_observations(counts)
    with pyro.plate("batch", num_replicas, dim=-1):
        alpha = pyro.sample("alpha_0", dist.Dirichlet(prior.expand(1, -1)).to_event(1))
        likelihood = dist.Categorical(probs=alpha)  # batch (..., replicas, tokens=1)
        likelihood = likelihood.expand(likelihood.batch_shape[:-1] + obs.shape)
        pyro.sample("obs", likelihood.to_event(1), obs=obs.expand(num_replicas, -1))


def toy_guide(counts: Tensor, prior: Tensor, num_replicas: int = 1,
              estimator: Estimator | str | None = None, init: Tensor | None = None) -> None:
    """Pyro guide: ``alpha_0 ~ Dir(a)``, ``a`` the positive param ``"toy_concentration"``.

    :param num_replicas: size of the ``batch`` plate, as in :func:`toy_model`.
    :param estimator: an estimator (or its name) whose Dirichlet sampler and site ``infer``
        options the guide uses; ``None`` uses ``pyro.distributions.Dirichlet``.
    :param init: initial ``a`` used when the param does not exist yet: ``(K,)``, shared by the
        replicas, or ``(num_replicas, K)``, one per replica; ones by default.
    """
    counts, prior = _check_toy(counts, prior)
    if init is None:
        init = torch.ones_like(prior)
    a = pyro.param(TOY_CONCENTRATION, lambda: init.detach().clone(),
                   constraint=constraints.positive)
    if estimator is None:
        family, infer = dist.Dirichlet, {}
    else:
        estimator = get_estimator(estimator)
        family, infer = estimator.dirichlet, estimator.site_infer()
    with pyro.plate("batch", num_replicas, dim=-1):
        concentration = a.expand(num_replicas, -1).unsqueeze(-2)  # (replicas, tokens=1, K)
        pyro.sample("alpha_0", family(concentration).to_event(1), infer=infer)


def gradient_draws(estimator: Estimator | str, a: Tensor, num_draws: int, counts: Tensor,
                   prior: Tensor, *, num_particles: int | None = None, batch_size: int = 100,
                   warmup: int = 0, baseline_lr: float = 0.01, seed: int | None = None
                   ) -> Tensor:
    """Independent gradient estimates of the toy ELBO with respect to ``a``, held fixed.

    Draws come ``batch_size`` at a time from one ``loss_and_grads`` of the estimator's ELBO on
    :func:`toy_model` / :func:`toy_guide` with that many independent replicas, each with its
    own copy of ``a`` (replicas share no term of any estimator's surrogate, so each copy's
    gradient is one estimate). Pyro's gradient on the unconstrained ``log a`` is mapped to
    ``a`` by the chain rule (divided by ``a``) and negated (ELBO, not loss). Auxiliary
    parameters (learned baselines) take one Adam step after every pass; decaying-average
    baselines update themselves. ``warmup`` passes are made first and discarded, so baselines
    can settle. The caller's param store and random state are left untouched.

    :param estimator: an estimator or its registry name.
    :param a: ``(K,)`` positive guide concentration (the point at which gradients are drawn).
    :param num_draws: number of gradient estimates ``M`` to return.
    :param num_particles: particles per estimate (default: the estimator's minimum).
    :param batch_size: draws per pass.
    :param warmup: discarded passes made first.
    :param baseline_lr: Adam learning rate of auxiliary parameters.
    :param seed: seeds the draws (``None``: continue the current random stream).
    :returns: ``(M, K)`` tensor of ELBO-gradient estimates, in the dtype of ``a``.
    """
    estimator = get_estimator(estimator)
    counts, prior = _check_toy(counts, prior)
    a = torch.as_tensor(a)
    if a.shape != prior.shape or not bool(torch.isfinite(a).all()) or not bool((a > 0).all()):
        raise ValueError(f"a must hold {prior.shape[0]} positive finite values, got {a}")
    if num_draws < 1 or batch_size < 1 or warmup < 0:
        raise ValueError(f"need num_draws >= 1, batch_size >= 1 and warmup >= 0, got "
                         f"{num_draws}, {batch_size}, {warmup}")
    prior = prior.to(a.dtype)
    particles = estimator.min_particles if num_particles is None else num_particles
    elbo = estimator.make_elbo(num_particles=particles, vectorize_particles=True,
                               max_plate_nesting=1)
    replicas = min(batch_size, num_draws)
    init = a.expand(replicas, -1)

    def guide(counts, prior):
        toy_guide(counts, prior, replicas, estimator=estimator, init=init)

    def model(counts, prior):
        toy_model(counts, prior, replicas)

    store = pyro.get_param_store()
    chunks = []
    with store.scope(), torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        optim = pyro.optim.Adam({"lr": baseline_lr})
        for i in range(warmup + -(-num_draws // replicas)):
            with poutine.trace(param_only=True) as capture:
                elbo.loss_and_grads(model, guide, counts, prior)
            params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
            log_a = store.get_param(TOY_CONCENTRATION).unconstrained()
            if i >= warmup:
                chunks.append(-log_a.grad / log_a.detach().exp())  # (replicas, K)
            auxiliary = [p for p in params if p is not log_a and p.grad is not None]
            if auxiliary:
                optim(auxiliary)
            for p in params:
                p.grad = None
    return torch.cat(chunks)[:num_draws]
