"""The conjugate Dirichlet-categorical toy, where the exact ELBO and its gradient are known.

Model and guide follow the routing model's site pattern (``pyro.plate("batch")``, the
routing-weight site ``alpha_0`` with the token dimension as an event dimension, the observed
site ``obs``)::

    model:  alpha ~ Dir(prior)                     # prior = beta0 * pi, (K,)
            obs_n ~ Categorical(alpha), n < N      # summarised by counts (K,)
    guide:  alpha ~ Dir(a)                         # a: a positive pyro.param

The likelihood is evaluated in log space (``logits = log alpha``): ``Categorical(probs=...)``
clamps probabilities at the dtype's epsilon, which biases the likelihood of draws at small
concentrations (at ``a = (0.05, 0.05, 1)`` the gradient draws averaged 310 against the exact
496.5 on one coordinate).

The guide is parameterised by the concentration ``a`` itself (Pyro optimises ``log a``
internally); gradients here are with respect to ``a``. With ``c = prior + counts``,
``a0 = sum(a)`` and ``E_k = psi(a_k) - psi(a0)``, the ELBO with its KL term scaled by
``lambda`` (``kl_scale``; the ELBO itself at 1) is::

    ELBO(a) = sum_k counts_k E_k - lambda KL(Dir(a) || Dir(prior))
    KL      = sum_k (a_k - prior_k) E_k - log B(a) + log B(prior)
    dELBO/da_j = counts_j psi'(a_j) - psi'(a0) sum_k counts_k
                 - lambda [(a_j - prior_j) psi'(a_j) - psi'(a0) sum_k (a_k - prior_k)]

where ``log B(a) = sum_k lgamma(a_k) - lgamma(a0)``. At ``lambda = 1`` the maximiser is the
exact posterior ``a = c``, where the ELBO equals the log evidence.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor
from torch.distributions import biject_to, constraints

from bayes_router.core.dirichlet import dirichlet_kl, expected_log_alpha, log_beta
from bayes_router.inference.estimators import Estimator, get_estimator
from bayes_router.inference.objective import AuxiliaryOptimiser

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


def toy_observations(counts: Tensor) -> Tensor:
    """The categorical observations ``(N,)`` (sorted category indices) that ``counts`` summarise."""
    counts = torch.as_tensor(counts)
    return torch.repeat_interleave(torch.arange(counts.shape[-1]), counts.round().long())


def toy_posterior(counts: Tensor, prior: Tensor) -> dist.Dirichlet:
    """The exact posterior ``Dir(prior + counts)``."""
    counts, prior = _check_toy(counts, prior)
    return dist.Dirichlet(prior + counts.to(prior.dtype))


def toy_elbo(a: Tensor, counts: Tensor, prior: Tensor, kl_scale: float = 1.0) -> Tensor:
    """Exact ELBO of the guide ``Dir(a)`` (batched over the leading dims of ``a``), its KL term
    scaled by ``kl_scale``."""
    counts, prior = _check_toy(counts, prior)
    counts = counts.to(prior.dtype)
    return ((counts * expected_log_alpha(a)).sum(-1)
            - kl_scale * dirichlet_kl(a, prior.expand_as(a)))


def toy_elbo_grad(a: Tensor, counts: Tensor, prior: Tensor, kl_scale: float = 1.0) -> Tensor:
    """Exact gradient of :func:`toy_elbo` with respect to ``a``, shape of ``a``."""
    counts, prior = _check_toy(counts, prior)
    a0 = a.sum(-1, keepdim=True)

    def grad_of_linear_term(weights):  # d/da sum_k weights_k E_k, weights fixed
        return (weights * torch.polygamma(1, a)
                - torch.polygamma(1, a0) * weights.sum(-1, keepdim=True))

    return grad_of_linear_term(counts.to(prior.dtype)) - kl_scale * grad_of_linear_term(a - prior)


def toy_log_evidence(counts: Tensor, prior: Tensor) -> Tensor:
    """``log p(obs) = log B(prior + counts) - log B(prior)``, the ELBO at the optimum."""
    counts, prior = _check_toy(counts, prior)
    return log_beta(prior + counts.to(prior.dtype)) - log_beta(prior)


def observe_counts(name: str, alpha: Tensor, counts: Tensor, num_replicas: int) -> None:
    """``N = sum(counts)`` categorical observations of ``alpha (..., replicas, 1, K)`` at site
    ``name``, with the likelihood in log space (no clamping of small probabilities)."""
    obs = toy_observations(counts)
    likelihood = dist.Categorical(logits=alpha.log())  # batch (..., replicas, tokens=1)
    likelihood = likelihood.expand(likelihood.batch_shape[:-1] + obs.shape)
    pyro.sample(name, likelihood.to_event(1), obs=obs.expand(num_replicas, -1))


def toy_model(counts: Tensor, prior: Tensor, num_replicas: int = 1,
              kl_scale: float = 1.0) -> None:
    """Pyro model: ``alpha_0 ~ Dir(prior)``, then ``N = sum(counts)`` categorical draws ``obs``.

    :param num_replicas: size of the ``batch`` plate: independent copies of the problem (the
        gradient lab uses them to draw many independent gradients in one pass).
    :param kl_scale: factor on the ``alpha_0`` site's log-density (as the routed LM's).
    """
    counts, prior = _check_toy(counts, prior)
    with pyro.plate("batch", num_replicas, dim=-1):
        with poutine.scale(scale=kl_scale):
            alpha = pyro.sample("alpha_0", dist.Dirichlet(prior.expand(1, -1)).to_event(1))
        observe_counts("obs", alpha, counts, num_replicas)


def toy_guide(counts: Tensor, prior: Tensor, num_replicas: int = 1,
              estimator: Estimator | str | None = None, init: Tensor | None = None,
              kl_scale: float = 1.0) -> None:
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
    with pyro.plate("batch", num_replicas, dim=-1), poutine.scale(scale=kl_scale):
        concentration = a.expand(num_replicas, -1).unsqueeze(-2)  # (replicas, tokens=1, K)
        pyro.sample("alpha_0", family(concentration).to_event(1), infer=infer)


def replica_gradient_draws(estimator: Estimator, model, guide, params: dict, num_draws: int,
                           replicas: int, *, num_particles: int | None = None,
                           warmup: int | None = None, baseline_lr: float = 0.01,
                           seed: int | None = None) -> Tensor:
    """Independent ELBO-gradient estimates from a model/guide pair with ``replicas`` copies.

    ``model`` and ``guide`` take no arguments and hold ``replicas`` independent copies of one
    problem in a ``batch`` plate, the guide's parameters ``params`` (``name -> constraint``)
    with one row per replica; replicas share no term of any estimator's surrogate, so each
    row's gradient is one estimate. Draws come ``replicas`` at a time from one
    ``loss_and_grads``. Pyro's gradient on the unconstrained value is mapped to the parameter
    by the chain rule and negated (ELBO, not loss). The estimator's auxiliary parameters
    (learned baselines) take one Adam step after every pass
    (:class:`~bayes_router.inference.objective.AuxiliaryOptimiser`); decaying-average baselines
    update themselves. ``warmup`` passes (default the estimator's ``warmup_steps``) are made
    first and discarded, so baselines can settle. The caller's param store and random state are
    left untouched.

    :returns: ``(M, D)``: per draw, the gradients of ``params`` in order, each flattened.
    """
    warmup = estimator.warmup_steps if warmup is None else warmup
    if num_draws < 1 or replicas < 1 or warmup < 0:
        raise ValueError(f"need num_draws >= 1, replicas >= 1 and warmup >= 0, got "
                         f"{num_draws}, {replicas}, {warmup}")
    particles = estimator.min_particles if num_particles is None else num_particles
    elbo = estimator.make_elbo(num_particles=particles, vectorize_particles=True,
                               max_plate_nesting=1)
    store = pyro.get_param_store()
    chunks = []
    with store.scope(), torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        auxiliary = AuxiliaryOptimiser(estimator, elbo, lr=baseline_lr)
        for i in range(warmup + -(-num_draws // replicas)):
            elbo.loss_and_grads(model, guide)
            for name, constraint in params.items():
                value = store.get_param(name)
                unconstrained = value.unconstrained()
                slope = biject_to(constraint).log_abs_det_jacobian(
                    unconstrained.detach(), value.detach()).exp()  # d value / d unconstrained
                if i >= warmup:
                    chunks.append(-unconstrained.grad / slope)
                unconstrained.grad = None
            auxiliary.step()
    draws = [torch.cat([g.reshape(replicas, -1) for g in chunks[j:j + len(params)]], -1)
             for j in range(0, len(chunks), len(params))]
    return torch.cat(draws)[:num_draws]


def gradient_draws(estimator: Estimator | str, a: Tensor, num_draws: int, counts: Tensor,
                   prior: Tensor, *, num_particles: int | None = None, batch_size: int = 100,
                   warmup: int | None = None, baseline_lr: float = 0.01,
                   seed: int | None = None, kl_scale: float = 1.0) -> Tensor:
    """Independent gradient estimates of the toy ELBO with respect to ``a``, held fixed.

    :func:`replica_gradient_draws` on :func:`toy_model` / :func:`toy_guide` with
    ``batch_size`` replicas, each with its own copy of ``a``.

    :param estimator: an estimator or its registry name.
    :param a: ``(K,)`` positive guide concentration (the point at which gradients are drawn).
    :param num_draws: number of gradient estimates ``M`` to return.
    :param num_particles: particles per estimate (default: the estimator's minimum).
    :param batch_size: draws per pass.
    :param warmup: discarded passes made first (default the estimator's ``warmup_steps``).
    :param baseline_lr: Adam learning rate of auxiliary parameters.
    :param seed: seeds the draws (``None``: continue the current random stream).
    :param kl_scale: factor on the KL term (:func:`toy_elbo`).
    :returns: ``(M, K)`` tensor of ELBO-gradient estimates, in the dtype of ``a``.
    """
    estimator = get_estimator(estimator)
    counts, prior = _check_toy(counts, prior)
    a = torch.as_tensor(a)
    if a.shape != prior.shape or not bool(torch.isfinite(a).all()) or not bool((a > 0).all()):
        raise ValueError(f"a must hold {prior.shape[0]} positive finite values, got {a}")
    if batch_size < 1:
        raise ValueError(f"need batch_size >= 1, got {batch_size}")
    prior = prior.to(a.dtype)
    replicas = min(batch_size, num_draws)
    init = a.expand(replicas, -1)

    def guide():
        toy_guide(counts, prior, replicas, estimator=estimator, init=init, kl_scale=kl_scale)

    def model():
        toy_model(counts, prior, replicas, kl_scale=kl_scale)

    return replica_gradient_draws(
        estimator, model, guide, {TOY_CONCENTRATION: constraints.positive}, num_draws,
        replicas, num_particles=num_particles, warmup=warmup, baseline_lr=baseline_lr,
        seed=seed).to(a.dtype)
