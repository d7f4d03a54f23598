"""The prior-free router: deterministic softmax routing ``alpha = softmax(MLP(features) / tau)``.

The baseline of the Bayesian router: the same controllers, no prior and no latent variables, so
it trains on the log-likelihood alone through
:class:`~bayes_router.models.routed_lm.DeterministicRoutedLM`'s Pyro pair; its uncertainty is
the normalised entropy of its routing weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayes_router.core.dirichlet import normalised_entropy
from bayes_router.core.validation import check_positive
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.routed_lm import DeterministicRoutedLM
from bayes_router.models.router import RoutingDecision


class PriorFreeRoutedLM(DeterministicRoutedLM):
    """The prior-free baseline: ``alpha = softmax(MLP(features) / tau)``, deterministic,
    trained on the log-likelihood (see :class:`DeterministicRoutedLM`)."""

    kind = "prior-free"

    def __init__(self, cfg: TinyLMConfig, tau: float = 1.0, costs: Tensor | None = None):
        super().__init__(cfg, costs)
        self.tau = check_positive("tau", tau)

    def decision(self, layer: int, features: Tensor, gate_measure: str = "total"
                 ) -> RoutingDecision:
        if gate_measure != "total":
            raise ValueError("the prior-free router has a single uncertainty measure: "
                             "gate_measure must be 'total'")
        logits = self.controllers[layer](features)
        weights = torch.softmax(logits / self.tau, -1)
        uncertainty = (normalised_entropy(weights) if self.cfg.n_experts > 1
                       else torch.zeros(weights.shape[:-1], dtype=weights.dtype))
        return RoutingDecision(weights=weights, mean=weights, uncertainty=uncertainty,
                               logits=logits)
