"""Does a token's routing uncertainty predict its loss, and the damage hard routing does to it?

*Damage* is the per-token ``KL(soft || hard)`` between the predictive distribution under soft
routing and under hard (argmax) routing, see :func:`kl_divergence_categorical`. An uncertainty
measure is useful for uncertainty-gated routing when it ranks the damaged tokens first: we report
the AUROC for picking out the most damaged tokens and Spearman rank correlations, next to a random
score as the chance baseline.

References:
  - *The meaning and use of the area under a ROC curve*, Hanley, McNeil (Radiology 1982)
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.stats import rankdata

from bayes_router.core.arrays import (
    check_n_bins,
    check_same_length,
    equal_mass_bin_index,
    float_array,
    label_array,
    to_numpy,
)

logger = logging.getLogger(__name__)


def _positives(positives, name: str = "positives") -> np.ndarray:
    labels = to_numpy(positives, name)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.size == 0:
        raise ValueError(f"{name} is empty")
    if labels.dtype != np.bool_:
        if not np.all(np.isin(labels, (0, 1))):
            raise ValueError(f"{name} must be boolean or hold only 0 and 1")
        labels = labels.astype(bool)
    return labels


def auroc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positives`` from the rest.

    Rank form of the Mann-Whitney statistic: the probability that a random positive scores above
    a random negative, ties counting one half (average ranks).

    :param scores: higher means "more likely positive" ``(N,)``.
    :param positives: boolean (or 0/1) class of each row ``(N,)``; both classes must occur.
    """
    score = float_array(scores, "scores", ndims=(1,))
    positive = _positives(positives)
    check_same_length(scores=score, positives=positive)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"positives must contain both classes for an AUROC, got {n_pos} positive and "
            f"{n_neg} negative rows"
        )
    ranks = rankdata(score)  # average ranks, 1-based
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if either input is
    constant."""
    xs = float_array(x, "x", ndims=(1,))
    ys = float_array(y, "y", ndims=(1,))
    check_same_length(x=xs, y=ys)
    rx = rankdata(xs) - (len(xs) + 1) / 2
    ry = rankdata(ys) - (len(ys) + 1) / 2
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denominator == 0.0:
        return math.nan
    return float(rx @ ry) / denominator


def top_fraction_mask(values, top_fraction: float = 0.1) -> np.ndarray:
    """Boolean mask of the ``ceil(top_fraction * N)`` largest values; rows tied with the smallest
    of them are included too, so the mask can be larger."""
    value = float_array(values, "values", ndims=(1,))
    if not 0.0 < top_fraction < 1.0:
        raise ValueError(f"top_fraction must lie in (0, 1), got {top_fraction!r}")
    n_top = max(1, math.ceil(top_fraction * len(value) - 1e-9))
    threshold = np.sort(value)[-n_top]
    return value >= threshold


def _measure_row(score: np.ndarray, top: np.ndarray, damage: np.ndarray,
                 nll: np.ndarray) -> dict[str, float]:
    both_classes = 0 < top.sum() < len(top)
    return {
        "auroc_top_damage": auroc(score, top) if both_classes else math.nan,
        "spearman_damage": spearman(score, damage),
        "spearman_nll": spearman(score, nll),
    }


def uncertainty_diagnostics(uncertainty: dict, nll, damage, top_fraction: float = 0.1,
                            seed: int = 0) -> dict:
    """How well each uncertainty measure predicts per-token damage and NLL.

    :param uncertainty: measure name -> per-token scores ``(N,)`` (higher = more uncertain).
    :param nll: per-token negative log-likelihood ``(N,)``.
    :param damage: per-token damage of hard routing, ``KL(soft || hard)`` ``(N,)``.
    :param top_fraction: the positives of the AUROC are the ``top_fraction`` most damaged tokens.
    :param seed: seed of the random-score baseline.
    :return: ``{"measures": {name: row}, "random_baseline": row, "n_tokens", "n_positive",
        "top_fraction", "damage_threshold"}`` where a row holds ``auroc_top_damage``,
        ``spearman_damage`` and ``spearman_nll`` (NaN where undefined, e.g. when ties in
        ``damage`` leave no negative rows).
    """
    if not isinstance(uncertainty, dict) or not uncertainty:
        raise ValueError("uncertainty must be a non-empty dict of name -> per-token scores")
    nll_ = float_array(nll, "nll", ndims=(1,))
    damage_ = float_array(damage, "damage", ndims=(1,))
    scores = {name: float_array(values, f"uncertainty[{name!r}]", ndims=(1,))
              for name, values in uncertainty.items()}
    n_tokens = check_same_length(nll=nll_, damage=damage_,
                                 **{f"uncertainty[{name!r}]": s for name, s in scores.items()})
    if n_tokens < 2:
        raise ValueError(f"nll and damage need at least 2 tokens, got {n_tokens}")
    top = top_fraction_mask(damage_, top_fraction)
    if top.all():
        logger.warning("all %d tokens tie for the top damage: AUROC is undefined", n_tokens)
    baseline = np.random.default_rng(seed).random(n_tokens)
    return {
        "measures": {name: _measure_row(s, top, damage_, nll_) for name, s in scores.items()},
        "random_baseline": _measure_row(baseline, top, damage_, nll_),
        "n_tokens": n_tokens,
        "n_positive": int(top.sum()),
        "top_fraction": float(top_fraction),
        "damage_threshold": float(damage_[top].min()),
    }


def mean_by_uncertainty_bin(values, uncertainty, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Mean of ``values`` within equal-mass bins (deciles for ``n_bins=10``) of ``uncertainty``.

    :return: ``{"mean_uncertainty", "mean_value", "count"}``, arrays ``(n_bins,)`` ordered from
        the least to the most uncertain bin; empty bins (fewer rows than bins) hold NaN.
    """
    n_bins = check_n_bins(n_bins)
    value = float_array(values, "values", ndims=(1,))
    score = float_array(uncertainty, "uncertainty", ndims=(1,))
    check_same_length(values=value, uncertainty=score)
    index = equal_mass_bin_index(score, n_bins)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "mean_uncertainty": np.bincount(index, score, n_bins) / count,
            "mean_value": np.bincount(index, value, n_bins) / count,
            "count": count,
        }


def routing_accuracy_by_decile(pred_expert, oracle, uncertainty, n_bins: int = 10) -> dict:
    """Accuracy of the chosen expert against an oracle, overall and per uncertainty decile.

    Tokens whose oracle label is ``-1`` (no correct expert defined) are ignored.

    :param pred_expert: expert index chosen per token ``(N,)``.
    :param oracle: correct expert per token, or -1 ``(N,)``.
    :param uncertainty: routing uncertainty per token ``(N,)``.
    :param n_bins: number of equal-mass uncertainty bins.
    :return: ``{"accuracy", "majority_baseline", "majority_label", "n_tokens", "bin_accuracy",
        "bin_count", "bin_mean_uncertainty"}``, bins ordered from the least to the most
        uncertain; ``majority_baseline`` is the accuracy of always choosing the most common
        oracle label (the bar a router must clear to have learned anything).
    """
    n_bins = check_n_bins(n_bins)
    pred = label_array(pred_expert, "pred_expert")
    target = label_array(oracle, "oracle")
    score = float_array(uncertainty, "uncertainty", ndims=(1,))
    check_same_length(pred_expert=pred, oracle=target, uncertainty=score)
    if np.any(pred < 0):
        raise ValueError("pred_expert must hold expert indices >= 0")
    if np.any(target < -1):
        raise ValueError("oracle must hold expert indices >= 0, or -1 for 'no oracle'")
    labelled = target != -1
    if not labelled.any():
        raise ValueError("oracle has no labelled token (all -1): nothing to score")
    correct = (pred == target)[labelled].astype(np.float64)
    binned = mean_by_uncertainty_bin(correct, score[labelled], n_bins)
    labels, counts = np.unique(target[labelled], return_counts=True)
    return {
        "accuracy": float(correct.mean()),
        # a router that sends every token to the most common label scores this much
        "majority_baseline": float(counts.max() / counts.sum()),
        "majority_label": int(labels[counts.argmax()]),
        "n_tokens": int(labelled.sum()),
        "bin_accuracy": binned["mean_value"],
        "bin_count": binned["count"],
        "bin_mean_uncertainty": binned["mean_uncertainty"],
    }


