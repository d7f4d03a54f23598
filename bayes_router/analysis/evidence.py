"""Evidence against commitment: does a token's likelihood pay for moving its posterior?

For a token ``t`` of layer ``l`` and an expert ``k`` the diagnostic compares

* the **gain**: the counterfactual log-likelihood change of routing that one token to ``k``
  instead of its current routing, every other token and layer keeping its current weights
  (the posterior means, soft routing). In a causal LM the token's routing reaches every later
  target of its sequence, so the gain sums ``log p(y_t' | ...)`` over ``t' >= t``:

  .. math:: g_{t,l}(w) = \\sum_{t' \\ge t} \\log p(y_{t'} | x; W_{t,l} \\leftarrow w)
                        - \\log p(y_{t'} | x; W),

  with ``w = e_k`` (one-hot: the most the likelihood can pay) or ``w = mean(a*)``, the mean of
  the cheapest committed guide below;
* the **cost**: the smallest KL an admissible guide pays to commit to ``k`` at a level
  (:func:`~bayes_router.core.commitment.commitment_cost`: ``k`` the argmax of the mean, or mean
  weight ``>= 0.5`` or ``>= 0.9``), which depends on the layer's prior and guide floor only;
* the **ELBO change** the guide would see by moving that token from its current posterior
  ``Dir(a_t)`` to the cheapest committed one ``Dir(a*)``, in the plug-in approximation of the
  likelihood term (weights at the posterior mean):

  .. math:: \\Delta_{t,l,k} = g_{t,l}(\\mathrm{mean}(a^*)) - (KL(a^* \\| \\beta_l)
                               - KL(a_t \\| \\beta_l)).

A token *has the evidence* to commit when ``g(e_k)`` exceeds the cost, and the ELBO *rewards*
the move when ``Delta > 0``. Shares of such tokens per layer, expert and level say whether a
Bayesian router on its prior is an optimiser failure (``Delta > 0`` for many tokens) or the
correct answer of the model (gains below costs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bayes_router.analysis.calibration_metrics import (
    curve_calibration_error,
    reliability_curve_from_confidence,
)
from bayes_router.analysis.diagnostics import auroc
from bayes_router.core.arrays import check_same_length, float_array, label_array
from bayes_router.core.commitment import DEFAULT_LEVELS, commitment_cost, floor_kl
from bayes_router.core.dirichlet import dirichlet_kl
from bayes_router.core.elbo_surgery import log_dirichlet_draws
from bayes_router.core.validation import check_int
from bayes_router.data.synthetic import ORACLE_LABELS
from bayes_router.models.tinylm import FixedRouting


@torch.no_grad()
def sequence_log_likelihood(model, x: Tensor, y: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """``(B,)`` log-likelihood of each sequence under the given per-layer weights ``(B, T, K)``
    (soft routing)."""
    logits = model.lm(x, FixedRouting(list(weights))).logits
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return -nll.view(x.shape).sum(1)


@torch.no_grad()
def counterfactual_gains(model, x: Tensor, y: Tensor, weights: Sequence[Tensor],
                         tokens: Tensor, layer: int, candidates: Tensor,
                         chunk: int = 256) -> Tensor:
    """Log-likelihood gain of setting token ``tokens[j] = (b, t)``'s weights in ``layer`` to each
    row of ``candidates``, all other weights as ``weights``.

    :param weights: per layer the current weights ``(B, T, K)``.
    :param tokens: ``(n, 2)`` long tensor of ``(sequence, position)``.
    :param candidates: ``(C, K)`` weight vectors (or ``(n, C, K)``, one set per token).
    :returns: ``(n, C)`` gains in nats.
    """
    n, K = tokens.shape[0], weights[0].shape[-1]
    candidates = candidates.to(weights[0].dtype)
    if candidates.dim() == 2:
        candidates = candidates.expand(n, *candidates.shape)
    C = candidates.shape[1]
    rows = tokens[:, 0].repeat_interleave(C)  # (n C,) sequence of each counterfactual
    positions = tokens[:, 1].repeat_interleave(C)
    values = candidates.reshape(n * C, K)
    base = sequence_log_likelihood(model, x, y, weights)  # (B,)
    out = torch.empty(n * C, dtype=base.dtype)
    for start in range(0, n * C, chunk):
        part = slice(start, min(start + chunk, n * C))
        r, p = rows[part], positions[part]
        w = [wl[r].clone() for wl in weights]
        w[layer][torch.arange(r.numel()), p] = values[part]
        out[part] = sequence_log_likelihood(model, x[r], y[r], w) - base[r]
    return out.view(n, C)


def commitment_table(prior: np.ndarray, floor: np.ndarray, levels=DEFAULT_LEVELS) -> dict:
    """The cheapest committed guide of every expert and level: ``kl (K, levels)`` and
    ``mean (K, levels, K)``, plus the layer's ``floor_kl``."""
    K = prior.shape[0]
    kl = np.empty((K, len(levels)))
    mean = np.empty((K, len(levels), K))
    for k in range(K):
        for i, level in enumerate(levels):
            cost = commitment_cost(prior, k, level, floor)
            kl[k, i], mean[k, i] = cost.kl, cost.mean
    return {"kl": kl, "mean": mean, "floor_kl": floor_kl(prior, floor)}


@torch.no_grad()
def layer_evidence(model, x: Tensor, y: Tensor, tokens: Tensor, layer: int,
                   weights: Sequence[Tensor], concentration: Tensor | None, prior: Tensor,
                   floor: Tensor, levels=DEFAULT_LEVELS) -> dict:
    """Gains, costs and ELBO changes of one layer for the sampled ``tokens``.

    :param concentration: ``(B, T, K)`` the guide's concentrations in this layer, or ``None``
        for a router without a guide (its current KL is then taken as the layer's floor KL: a
        guide sitting at its cheapest admissible posterior).
    :returns: ``gain (n, K)`` (one-hot), ``gain_committed (n, K, levels)`` (at the committed
        means), ``cost (K, levels)``, ``kl_current (n,)``, ``delta_elbo (n, K, levels)`` and
        ``floor_kl``.
    """
    prior_np, floor_np = prior.double().numpy(), floor.double().numpy()
    table = commitment_table(prior_np, floor_np, levels)
    K = prior.shape[0]
    candidates = torch.cat([torch.eye(K, dtype=torch.float64),
                            torch.from_numpy(table["mean"].reshape(-1, K))])
    gains = counterfactual_gains(model, x, y, weights, tokens, layer, candidates).double()
    gain, committed = gains[:, :K], gains[:, K:].reshape(-1, K, len(levels))
    if concentration is None:
        kl_current = torch.full((tokens.shape[0],), table["floor_kl"], dtype=torch.float64)
    else:
        a = concentration[tokens[:, 0], tokens[:, 1]].double()
        kl_current = dirichlet_kl(a, prior.double())
    cost = torch.from_numpy(table["kl"])
    delta = committed - (cost[None] - kl_current[:, None, None])
    return {"gain": gain.numpy(), "gain_committed": committed.numpy(), "cost": table["kl"],
            "kl_current": kl_current.numpy(), "delta_elbo": delta.numpy(),
            "floor_kl": table["floor_kl"]}


def summarise_layer(evidence: dict, experts: Sequence[str], levels=DEFAULT_LEVELS) -> dict:
    """Per expert: the gain's mean, quantiles and share above 0, and per level the cost, the
    share of tokens whose one-hot gain exceeds it, the share with a positive ELBO change and
    the mean ELBO change."""
    gain, cost, delta = evidence["gain"], evidence["cost"], evidence["delta_elbo"]
    summary = {}
    for k, name in enumerate(experts):
        g = gain[:, k]
        summary[name] = {
            "gain_mean": float(g.mean()), "gain_median": float(np.median(g)),
            "gain_q10": float(np.quantile(g, 0.1)), "gain_q90": float(np.quantile(g, 0.9)),
            "gain_positive_share": float((g > 0).mean()),
            "levels": {str(level): {
                "cost": float(cost[k, i]),
                "share_gain_exceeds_cost": float((g > cost[k, i]).mean()),
                "share_elbo_rewards_move": float((delta[:, k, i] > 0).mean()),
                "delta_elbo_mean": float(delta[:, k, i].mean()),
            } for i, level in enumerate(levels)},
        }
    return summary


# ------------------------------------------------------------------ calibration of the decisions

#: Draws of alpha held in memory at once by :func:`argmax_probability`.
CHUNK_ENTRIES = 1 << 22


def argmax_probability(concentration, draws: int = 4000, seed: int = 0) -> np.ndarray:
    """``P(alpha_j = max_k alpha_k)`` under ``Dir(a)`` for ``j`` the argmax of the posterior
    mean ``a / a0``: the posterior probability that the expert a hard router picks is the one
    with the largest weight. Monte Carlo over ``draws`` draws per row (standard error at most
    ``0.5 / sqrt(draws)``), taken in log space so concentrations far below 1 never tie at 0.

    :param concentration: ``(n, K)`` Dirichlet concentrations.
    """
    a = float_array(concentration, "concentration", ndims=(2,)).astype(np.float64)
    if a.shape[1] < 2 or not np.all(np.isfinite(a) & (a > 0)):
        raise ValueError("concentration must have shape (n, K >= 2) with positive finite "
                         "values")
    check_int("draws", draws)
    rng = np.random.default_rng(seed)
    chosen = a.argmax(1)  # the argmax of the mean: the same order as a
    rows = max(1, CHUNK_ENTRIES // (draws * a.shape[1]))  # bound the draws held at once
    probability = np.empty(a.shape[0])
    for start in range(0, a.shape[0], rows):
        part = slice(start, start + rows)
        log_alpha = log_dirichlet_draws(a[part], draws, rng)  # (rows, S, K)
        probability[part] = (log_alpha.argmax(-1) == chosen[part, None]).mean(1)
    return probability


def oracle_experts(oracle, experts: Sequence[str]) -> np.ndarray:
    """The expert index each oracle label names (:data:`~bayes_router.data.synthetic.
    ORACLE_LABELS`), ``-1`` for "any" and for experts the model lacks."""
    label = label_array(oracle, "oracle")
    if np.any(label < -1) or np.any(label >= len(ORACLE_LABELS)):
        raise ValueError(f"oracle must hold label ids in [-1, {len(ORACLE_LABELS)})")
    index = np.array([list(experts).index(n) if n in experts else -1 for n in ORACLE_LABELS])
    return np.where(label >= 0, index[np.clip(label, 0, None)], -1)


def decision_calibration(best, weights, uncertainty: dict, argmax_prob=None,
                         n_bins: int = 10, seed: int = 0) -> dict:
    """Is the router right when it is confident in its argmax expert?

    A token's decision is *right* when the argmax of its routing weights is ``best`` (the
    counterfactual-best expert of :func:`layer_evidence`'s gains, or an oracle's label). Its
    confidence is the argmax weight and, for a router with a posterior, the posterior
    probability that the argmax is the largest weight (:func:`argmax_probability`). Each
    confidence gets an equal-width reliability curve and ECE
    (:func:`~bayes_router.analysis.calibration_metrics.reliability_curve_from_confidence`), and each
    uncertainty measure the AUROC for picking out the wrong decisions, beside a random score.

    :param best: ``(n,)`` the right expert per token, ``-1`` where none is defined (skipped).
    :param weights: ``(n, K)`` routing weights (posterior means or softmax weights).
    :param uncertainty: measure name -> ``(n,)`` scores, higher meaning more uncertain.
    :param argmax_prob: ``(n,)`` or ``None`` (a router without a posterior).
    :return: ``accuracy`` (share of right decisions), ``best_share`` and ``chosen_share`` per
        expert, ``n_tokens``, ``confidence`` (per confidence: ``mean``, ``ece`` and its
        ``curve``), ``auroc_wrong`` (per measure, NaN when every decision is right or every one
        wrong) and ``auroc_wrong_random``.
    """
    target = label_array(best, "best")
    w = float_array(weights, "weights", ndims=(2,))
    scores = {name: float_array(v, f"uncertainty[{name!r}]", ndims=(1,))
              for name, v in uncertainty.items()}
    confidences = {"argmax_weight": w.max(1)}
    if argmax_prob is not None:
        confidences["argmax_probability"] = float_array(argmax_prob, "argmax_prob",
                                                        ndims=(1,))
    check_same_length(best=target, weights=w, **scores, **confidences)
    if np.any(target < -1) or np.any(target >= w.shape[1]):
        raise ValueError(f"best must hold expert indices in [0, {w.shape[1]}) or -1")
    kept = target >= 0
    if not kept.any():
        raise ValueError("best has no defined expert (all -1): nothing to score")
    right = w[kept].argmax(1) == target[kept]
    K = w.shape[1]
    result = {"accuracy": float(right.mean()), "n_tokens": int(kept.sum()),
              "best_share": (np.bincount(target[kept], minlength=K) / kept.sum()).tolist(),
              "chosen_share": (np.bincount(w[kept].argmax(1), minlength=K)
                               / kept.sum()).tolist(),
              "confidence": {}}
    for name, confidence in confidences.items():
        curve = reliability_curve_from_confidence(confidence[kept], right, n_bins)
        result["confidence"][name] = {
            "mean": float(confidence[kept].mean()), "ece": curve_calibration_error(curve),
            "curve": {"confidence": curve.confidence.tolist(),
                      "accuracy": curve.accuracy.tolist(), "count": curve.count.tolist(),
                      "edges": curve.edges.tolist()}}
    wrong = ~right
    both = 0 < wrong.sum() < len(wrong)
    result["auroc_wrong"] = {name: auroc(s[kept], wrong) if both else math.nan
                             for name, s in scores.items()}
    random_score = np.random.default_rng(seed).random(int(kept.sum()))
    result["auroc_wrong_random"] = auroc(random_score, wrong) if both else math.nan
    return result
