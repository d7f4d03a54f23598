"""Per-token statistics of an analysis pass
(:class:`~bayes_router.inference.evaluate.TokenArrays`): routing uncertainty per layer, the
scores the diagnostics rank, routing accuracy against a synthetic task's oracle and prediction
quality per oracle label."""

from __future__ import annotations

import math

import numpy as np
import torch

from bayes_router.analysis.diagnostics import routing_accuracy_by_decile
from bayes_router.core.dirichlet import normalised_entropy, routing_uncertainty
from bayes_router.data.synthetic import ORACLE_LABEL_IDS, ORACLE_LABELS
from bayes_router.inference.evaluate import TokenArrays


def token_uncertainty(arrays: TokenArrays) -> dict[str, np.ndarray]:
    """Per-layer, per-token routing uncertainty ``(L, N)``: ``total``, ``aleatoric``,
    ``epistemic`` (nats) and ``concentration`` ``a0`` from the guide, or for the prior-free
    router the ``total`` entropy of its softmax weights only."""
    if arrays.concentration is not None:
        parts = routing_uncertainty(arrays.concentration)
        return {"total": parts.total, "aleatoric": parts.aleatoric,
                "epistemic": parts.epistemic, "concentration": parts.concentration}
    n_experts = arrays.abar.shape[-1]
    entropy = normalised_entropy(torch.from_numpy(arrays.abar).double()) * math.log(n_experts)
    return {"total": entropy.numpy()}



def uncertainty_scores(uncertainty: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-token scores (higher = more uncertain) for the diagnostics: each measure averaged over
    layers and per layer (``"<measure>/layer<l>"``); the concentration enters as ``-log a0``."""
    scores = {}
    for name, values in uncertainty.items():
        if name == "concentration":
            name, values = "neg_log_concentration", -np.log(values)
        scores[name] = values.mean(0)
        for layer, row in enumerate(values):
            scores[f"{name}/layer{layer}"] = row
    return scores


# one pass over the split
def _expert_oracle_ids(expert_names) -> np.ndarray:
    """Oracle label id of each of the model's experts (an id no oracle uses when unknown)."""
    return np.array([ORACLE_LABELS.index(name) if name in ORACLE_LABELS
                     else len(ORACLE_LABELS) + k for k, name in enumerate(expert_names)])


# ------------------------------------------------------------------------------------------------
def oracle_accuracy(abar: np.ndarray, oracle: np.ndarray, total: np.ndarray,
                    expert_names) -> list[dict]:
    """Per layer: accuracy of the argmax expert against the oracle, overall and per decile of
    total routing uncertainty (``routing_accuracy_by_decile``)."""
    ids = _expert_oracle_ids(expert_names)
    rows = []
    for layer in range(abar.shape[0]):
        result = routing_accuracy_by_decile(ids[abar[layer].argmax(-1)], oracle, total[layer])
        rows.append({"layer": layer, **result})
    return rows



def oracle_label_quality(probs: np.ndarray, targets: np.ndarray, nll: np.ndarray,
                         oracle: np.ndarray) -> dict:
    """Per oracle label (and ``"any"``): the share of targets, their mean NLL and the argmax
    accuracy of the plug-in predictive."""
    correct = probs.argmax(-1) == targets
    result = {}
    for name, label in ORACLE_LABEL_IDS.items():
        mask = oracle == label
        if mask.any():
            result[name] = {"share": float(mask.mean()), "tokens": int(mask.sum()),
                            "nll": float(nll[mask].mean()),
                            "accuracy": float(correct[mask].mean())}
    return result


def summary(values: np.ndarray) -> dict:
    """Mean, median, 90th percentile and maximum of ``values``."""
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p90": float(np.quantile(values, 0.9)), "max": float(values.max())}

