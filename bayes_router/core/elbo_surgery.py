"""ELBO surgery: the mean KL of a layer's guide split into per-token information and the static
allocation.

With tokens ``x_1..x_N`` weighted equally, guide posteriors ``q_j = Dir(a_j)`` and the layer's
prior ``p = Dir(beta)``, the mean KL of the ELBO splits exactly as

.. math:: \\frac1N \\sum_j KL(q_j \\| p) = I(x; \\alpha) + KL(\\bar q \\| p),
          \\qquad \\bar q = \\frac1N \\sum_j q_j,

where ``I(x; alpha) = (1/N) sum_j KL(q_j || qbar)`` is the mutual information between the token
and its routing weights under the aggregate posterior ``qbar`` (the mixture of the tokens'
Dirichlets). ``I`` is what the router spends on routing tokens *differently from each other*;
``KL(qbar || p)`` is what it spends on moving the *static* allocation away from the prior. A
router whose tokens all share one posterior has ``I = 0``; ``I <= log N`` always, with equality
when the tokens' posteriors do not overlap.

**Estimator.** The mean KL is computed in closed form over all tokens. ``I`` is estimated by
Monte Carlo over a subsample of ``M`` tokens (all of them when ``N <= M``), whose mixture stands
for ``qbar``:

.. math:: I = \\frac1M \\sum_j E_{\\alpha \\sim q_j}\\Big[\\log M - \\operatorname{logsumexp}_i
          \\big(\\log q_i(\\alpha) - \\log q_j(\\alpha)\\big)\\Big],

each token's term written relative to its own density, so identical tokens give exactly 0 and
non-overlapping ones exactly ``log M`` (no Monte Carlo noise in either limit), and the estimate
never exceeds ``log M``. ``KL(qbar || p)`` is then the mean KL minus ``I``, so the two parts add
up to the logged KL by construction. The subsample's mixture makes the estimate consistent as
``M`` grows (the tests check it against quadrature); ``information_se`` is its standard error:
the draws' noise, plus the subsample's when ``M < N``. Draws are taken in log space
(``log Gamma(a + 1) + log(U) / a``), so concentrations far below 1 never underflow to
``alpha_k = 0``.

References:
  - *ELBO surgery: yet another way to carve up the variational evidence lower bound*, Hoffman,
    Johnson (NIPS 2016 Workshop on Advances in Approximate Bayesian Inference)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import gammaln, logsumexp

from bayes_router.core.dirichlet import dirichlet_kl
from bayes_router.core.validation import check_int

#: Tokens whose mixture stands for the aggregate posterior, and draws per token.
DEFAULT_SUBSAMPLE = 512
DEFAULT_DRAWS = 4


@dataclass(frozen=True)
class KLSplit:
    """One layer's mean KL and its two parts, in nats per token.

    :ivar kl: ``(1/N) sum_j KL(q_j || p)`` over all ``N`` tokens (closed form).
    :ivar information: ``I(x; alpha)``, the per-token information (Monte Carlo).
    :ivar marginal_kl: ``KL(qbar || p)``, the static allocation's cost: ``kl - information``.
    :ivar information_se: the Monte Carlo standard error of ``information``.
    :ivar n_tokens: ``N``; ``n_subsample``: the ``M`` tokens of the mixture.
    """

    kl: float
    information: float
    marginal_kl: float
    information_se: float
    n_tokens: int
    n_subsample: int


def log_dirichlet_draws(a: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``(M, draws, K)`` draws of ``log alpha`` from ``Dir(a_j)`` for each row of ``a (M, K)``."""
    shape = (a.shape[0], draws, a.shape[1])
    log_gamma = (np.log(rng.gamma(a[:, None, :] + 1.0, size=shape))
                 + np.log(rng.uniform(size=shape)) / a[:, None, :])
    return log_gamma - logsumexp(log_gamma, axis=-1, keepdims=True)


def _log_density(log_alpha: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``log Dir(alpha | a_i)`` of every draw ``(S, K)`` under every row of ``a (M, K)``:
    ``(S, M)``."""
    log_norm = gammaln(a.sum(-1)) - gammaln(a).sum(-1)  # (M,)
    return log_alpha @ (a - 1.0).T + log_norm


def split_kl(concentration, prior, *, subsample: int = DEFAULT_SUBSAMPLE,
             draws: int = DEFAULT_DRAWS, seed: int = 0) -> KLSplit:
    """The ELBO-surgery split of one layer's mean KL (see the module docstring).

    :param concentration: the guide's concentrations ``(..., K)``, one row per token.
    :param prior: the layer's prior concentration ``(K,)``.
    :param subsample: ``M``, the tokens whose mixture stands for ``qbar``.
    :param draws: Monte Carlo draws of ``alpha`` per subsampled token.
    :param seed: seed of the subsample and the draws (the split never touches torch's RNG).
    """
    a = torch.as_tensor(concentration).detach().to(torch.float64).reshape(
        -1, torch.as_tensor(concentration).shape[-1])
    beta = torch.as_tensor(prior).detach().to(torch.float64)
    if beta.shape != a.shape[-1:]:
        raise ValueError(f"prior must have shape ({a.shape[-1]},) to match the concentrations' "
                         f"K, got {tuple(beta.shape)}")
    if a.shape[0] == 0:
        raise ValueError("concentration holds no token")
    if not bool(torch.isfinite(beta).all()) or not bool((beta > 0).all()):
        raise ValueError(f"prior must hold positive finite values, got {beta.tolist()}")
    check_int("subsample", subsample)
    check_int("draws", draws)
    kl = float(dirichlet_kl(a, beta).mean())  # validates a and beta: positive and finite
    rng = np.random.default_rng(seed)
    rows = a.cpu().numpy()
    if rows.shape[0] > subsample:
        rows = rows[rng.choice(rows.shape[0], subsample, replace=False)]
    M = rows.shape[0]
    log_alpha = log_dirichlet_draws(rows, draws, rng)  # (M, S, K)
    log_q = _log_density(log_alpha.reshape(M * draws, -1), rows).reshape(M, draws, M)
    own = log_q[np.arange(M), :, np.arange(M)]  # (M, S): log q_j of token j's own draws
    terms = math.log(M) - logsumexp(log_q - own[..., None], axis=-1)  # (M, S)
    information = float(terms.mean())
    return KLSplit(kl=kl, information=information, marginal_kl=kl - information,
                   information_se=_standard_error(terms, a.shape[0]), n_tokens=int(a.shape[0]),
                   n_subsample=M)


def _standard_error(terms: np.ndarray, n_tokens: int) -> float:
    """Standard error of the mean of ``terms (M, S)``: the draws' noise within each token plus,
    when the ``M`` tokens are a subsample of ``n_tokens``, the tokens' spread with the finite
    population correction (so it is the draws' noise alone when every token is used)."""
    M, S = terms.shape
    if M * S < 2:
        return 0.0
    if S == 1:  # no within-token spread to measure: the tokens' spread bounds it
        return float(terms[:, 0].std(ddof=1) / math.sqrt(M))
    within = float(terms.var(axis=1, ddof=1).mean()) / (S * M)
    between = (1 - M / n_tokens) * float(terms.mean(1).var(ddof=1)) / M if M > 1 else 0.0
    return math.sqrt(within + between)
