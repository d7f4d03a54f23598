"""A two-site toy with an autoregressive guide, whose exact ELBO gradient comes from quadrature.

The routed LM's guide is autoregressive over layers: layer ``l``'s concentration depends on the
samples of the layers below. Estimators that treat each site's distribution on its own (e.g.
by detaching its parameters) can be right on a single-site toy and wrong here. The toy keeps
the LM's site pattern (a ``batch`` plate of independent replicas, ``alpha_0`` and ``alpha_1``
with one token as event dimension, observed sites) with ``K = 2`` experts, so that every
expectation is a one-dimensional integral::

    model:  z1 ~ Dir(prior[0])                    # alpha_0
            z2 ~ Dir(prior[1] + coupling * z1)    # alpha_1 (coupling = 0: independent priors)
            obs_0 ~ Categorical(z1)  (counts[0]),  obs_1 ~ Categorical(z2)  (counts[1])
    guide:  z1 ~ Dir(a)
            z2 ~ Dir(b + c * z1)                  # depends on the sample z1

With ``lambda`` the KL scale on the ``alpha`` sites (1: the ELBO itself)::

    ELBO = sum_k counts[0]_k E_a[log z1_k] - lambda KL(Dir(a) || Dir(prior[0]))
           + E_{z1 ~ Dir(a)}[ h(z1) ]
    h(z1) = sum_k counts[1]_k E_beta[log z2_k] - lambda KL(Dir(beta) || Dir(p2(z1)))
    beta  = b + c z1,   p2(z1) = prior[1] + coupling * z1

The first line is closed form; the outer expectation of ``h``, smooth on the simplex, is a
Gauss-Kronrod quadrature against the Beta weight ``u^(a1-1) (1-u)^(a2-1)``
(``scipy.integrate.quad`` with ``weight="alg"``, exact at the endpoint singularities), and the
gradient is a central finite difference of that quadrature. With ``counts[1] = 0`` the exact
posterior ``Dir(prior[0] + counts[0]) x Dir(prior[1] + coupling z1)`` lies in the guide family
(``a = prior[0] + counts[0], b = prior[1], c = coupling``), where path-derivative estimators
have zero variance.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from scipy import integrate, special
from torch import Tensor
from torch.distributions import constraints

from bayes_router.inference.estimators import Estimator, get_estimator
from bayes_router.variance.toy import observe_counts, replica_gradient_draws

FIRST_CONCENTRATION = "two_site_a"
SECOND_BASE = "two_site_b"
SECOND_COUPLING = "two_site_c"
PARAMETER_NAMES = ("a1", "a2", "b1", "b2", "c")


def _kl(q: np.ndarray, p: np.ndarray) -> float:
    """``KL(Dir(q) || Dir(p))``."""
    q0, p0 = q.sum(), p.sum()
    return float(special.gammaln(q0) - special.gammaln(q).sum() - special.gammaln(p0)
                 + special.gammaln(p).sum()
                 + ((q - p) * (special.digamma(q) - special.digamma(q0))).sum())


def _expected_log(q: np.ndarray) -> np.ndarray:
    return special.digamma(q) - special.digamma(q.sum())


def two_site_elbo(theta, counts, prior, coupling: float = 0.0, kl_scale: float = 1.0) -> float:
    """Exact ELBO of the guide ``theta = (a1, a2, b1, b2, c)`` (module docstring), by quadrature.

    :param counts: ``(2, 2)`` observation counts of the two sites.
    :param prior: ``(2, 2)`` prior concentrations.
    :raises ValueError: where a guide concentration ``b + c z1`` is not positive on the simplex.
    """
    a = np.asarray(theta[:2], dtype=np.float64)
    b, c = np.asarray(theta[2:4], dtype=np.float64), float(theta[4])
    counts = np.asarray(counts, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64)
    if (a <= 0).any() or (b <= 0).any() or (b + c <= 0).any():
        raise ValueError(f"guide concentrations must be positive on the simplex, got {theta}")
    first = float((counts[0] * _expected_log(a)).sum()) - kl_scale * _kl(a, prior[0])

    def h(u: float) -> float:
        z1 = np.array([u, 1.0 - u])
        beta = b + c * z1
        return (float((counts[1] * _expected_log(beta)).sum())
                - kl_scale * _kl(beta, prior[1] + coupling * z1))

    integral, _ = integrate.quad(h, 0.0, 1.0, weight="alg", wvar=(a[0] - 1.0, a[1] - 1.0),
                                 epsabs=1e-13, epsrel=1e-13, limit=200)
    log_norm = special.betaln(a[0], a[1])
    return first + integral / math.exp(log_norm)


def two_site_elbo_grad(theta, counts, prior, coupling: float = 0.0, kl_scale: float = 1.0,
                       step: float = 1e-5) -> np.ndarray:
    """``d ELBO / d theta`` by central differences of :func:`two_site_elbo`, ``(5,)``."""
    theta = np.asarray(theta, dtype=np.float64)
    grad = np.empty_like(theta)
    for i in range(theta.shape[0]):
        h = step * max(1.0, abs(theta[i]))
        up, down = theta.copy(), theta.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (two_site_elbo(up, counts, prior, coupling, kl_scale)
                   - two_site_elbo(down, counts, prior, coupling, kl_scale)) / (2 * h)
    return grad


def two_site_log_evidence(counts, prior) -> float:
    """``log p(obs)`` when ``counts[1] = 0`` (then ``z2`` integrates out for any coupling)."""
    counts, prior = np.asarray(counts, np.float64), np.asarray(prior, np.float64)
    if counts[1].any():
        raise ValueError("the closed-form evidence needs counts[1] = 0")
    return float(special.betaln(*(prior[0] + counts[0])) - special.betaln(*prior[0]))


def two_site_model(counts: Tensor, prior: Tensor, coupling: float = 0.0,
                   num_replicas: int = 1, kl_scale: float = 1.0) -> None:
    """The Pyro model of the module docstring (``counts``, ``prior``: ``(2, K)``)."""
    with pyro.plate("batch", num_replicas, dim=-1):
        with poutine.scale(scale=kl_scale):
            z1 = pyro.sample("alpha_0", dist.Dirichlet(prior[0].expand(1, -1)).to_event(1))
            z2 = pyro.sample("alpha_1", dist.Dirichlet(prior[1] + coupling * z1).to_event(1))
        for site, (z, n) in enumerate(((z1, counts[0]), (z2, counts[1]))):
            if bool(n.sum() > 0):
                observe_counts(f"obs_{site}", z, n, num_replicas)


def two_site_guide(init: Tensor, num_replicas: int = 1, estimator: Estimator | str | None = None,
                   kl_scale: float = 1.0) -> None:
    """The autoregressive guide: params ``a``, ``b`` (positive, ``(replicas, K)``) and ``c``
    (real, ``(replicas, 1)``), initialised from ``init = (a1, a2, b1, b2, c)``."""
    init = torch.as_tensor(init)
    a = pyro.param(FIRST_CONCENTRATION, lambda: init[:2].expand(num_replicas, 2).clone(),
                   constraint=constraints.positive)
    b = pyro.param(SECOND_BASE, lambda: init[2:4].expand(num_replicas, 2).clone(),
                   constraint=constraints.positive)
    c = pyro.param(SECOND_COUPLING, lambda: init[4:].expand(num_replicas, 1).clone())
    estimator = get_estimator("reparam-mc" if estimator is None else estimator)
    with pyro.plate("batch", num_replicas, dim=-1), poutine.scale(scale=kl_scale):
        z1 = pyro.sample("alpha_0", estimator.dirichlet(a.unsqueeze(-2)).to_event(1),
                         infer=estimator.site_infer())  # (..., replicas, 1, K)
        concentration = b.unsqueeze(-2) + c.unsqueeze(-1) * z1
        pyro.sample("alpha_1", estimator.dirichlet(concentration).to_event(1),
                    infer=estimator.site_infer())


def two_site_gradient_draws(estimator: Estimator | str, theta, num_draws: int, counts, prior,
                            *, coupling: float = 0.0, kl_scale: float = 1.0,
                            num_particles: int | None = None, batch_size: int = 2000,
                            warmup: int | None = None, seed: int | None = None) -> Tensor:
    """Independent gradient estimates ``(M, 5)`` with respect to ``theta = (a1, a2, b1, b2, c)``
    (see :func:`~bayes_router.variance.toy.replica_gradient_draws`)."""
    estimator = get_estimator(estimator)
    theta = torch.as_tensor(theta, dtype=torch.float64)
    counts = torch.as_tensor(counts, dtype=torch.float64)
    prior = torch.as_tensor(prior, dtype=torch.float64)
    if theta.shape != (5,) or counts.shape != (2, 2) or prior.shape != (2, 2):
        raise ValueError("theta must have shape (5,), counts and prior (2, 2)")
    replicas = min(batch_size, num_draws)

    def guide():
        two_site_guide(theta, replicas, estimator=estimator, kl_scale=kl_scale)

    def model():
        two_site_model(counts, prior, coupling, replicas, kl_scale=kl_scale)

    params = {FIRST_CONCENTRATION: constraints.positive, SECOND_BASE: constraints.positive,
              SECOND_COUPLING: constraints.real}
    return replica_gradient_draws(estimator, model, guide, params, num_draws, replicas,
                                  num_particles=num_particles, warmup=warmup, seed=seed)
