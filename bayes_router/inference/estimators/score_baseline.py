"""Score-function gradients with a decaying-average baseline (``TraceGraph_ELBO``).

Paper: Schulman, Heess, Weber, Abbeel (2015), *Gradient Estimation Using Stochastic
Computation Graphs*. Unbiased (the baseline uses earlier samples only).
"""

from __future__ import annotations

from pyro.infer import TraceGraph_ELBO
from torch import Tensor

from bayes_router.inference.estimators.base import Estimator
from bayes_router.inference.estimators.score import ScoreFunctionDirichlet


class ScoreBaseline(Estimator):
    """Score function with downstream-cost Rao-Blackwellisation and an average baseline.

    :class:`~pyro.infer.TraceGraph_ELBO` multiplies each non-reparameterised site's score by
    its *downstream* cost only (found by provenance tracking), minus a baseline: here a
    decaying average of past downstream costs, ``b <- beta * b + (1 - beta) * cost``, kept in
    the param store under ``__baseline_avg_downstream_cost_<site>``. The baseline of a step is
    built from earlier samples only, so the estimator stays unbiased.

    :param float baseline_beta: decay of the running average, in ``[0, 1)``.

    References

    [1] `Gradient Estimation Using Stochastic Computation Graphs`,
        John Schulman, Nicolas Heess, Theophane Weber, Pieter Abbeel (NeurIPS 2015)

    [2] `Black Box Variational Inference`,
        Rajesh Ranganath, Sean Gerrish, David M. Blei (AISTATS 2014)
    """

    pathwise = False
    warmup_steps = 20
    name = "score-baseline"
    owns_state = True
    unbiased = True
    reference = ("Schulman, Heess, Weber, Abbeel (2015), Gradient Estimation Using Stochastic "
                 "Computation Graphs; Ranganath, Gerrish, Blei (2014), Black Box Variational "
                 "Inference")

    def __init__(self, baseline_beta: float = 0.9):
        if not 0.0 <= baseline_beta < 1.0:
            raise ValueError(f"baseline_beta must be in [0, 1), got {baseline_beta}")
        self.baseline_beta = float(baseline_beta)

    def family(self, concentration: Tensor) -> ScoreFunctionDirichlet:
        return ScoreFunctionDirichlet(concentration)

    def site_infer(self) -> dict:
        return {"baseline": {"use_decaying_avg_baseline": True,
                             "baseline_beta": self.baseline_beta}}

    def make_elbo(self, num_particles: int = 1, vectorize_particles: bool = True,
                  **kwargs) -> TraceGraph_ELBO:
        return TraceGraph_ELBO(num_particles=self.check_num_particles(num_particles),
                               vectorize_particles=vectorize_particles, **kwargs)
