"""ELBO gradient estimators for Dirichlet routing weights, one per module, behind a registry.

Each estimator pairs the Dirichlet sampler the guide must use (:meth:`Estimator.dirichlet`,
plus per-site options from :meth:`Estimator.site_infer`) with the ELBO that builds its surrogate
loss (:meth:`Estimator.make_elbo`). Models and guides follow one pattern: routing-weight sites
``alpha_0, alpha_1, ...`` with the same names in model and guide, a ``batch`` plate, and the
observed site ``obs``.
"""

from bayes_router.inference.estimators.base import Estimator
from bayes_router.inference.estimators.dreg import DReG, DReG_ELBO
from bayes_router.inference.estimators.iwae import IWAE
from bayes_router.inference.estimators.naive_gamma import NaiveGamma, NormalisedGammaDirichlet
from bayes_router.inference.estimators.registry import (
    ESTIMATORS,
    estimator_names,
    get_estimator,
)
from bayes_router.inference.estimators.reparam_analytic import ReparamAnalytic
from bayes_router.inference.estimators.reparam_mc import ReparamMC
from bayes_router.inference.estimators.rsvi import RSVI, RSVIDirichlet
from bayes_router.inference.estimators.score import ScoreFunction, ScoreFunctionDirichlet
from bayes_router.inference.estimators.score_baseline import ScoreBaseline
from bayes_router.inference.estimators.score_nn_baseline import (
    DirichletBaselineNet,
    NeuralBaselineTraceGraph_ELBO,
    ScoreNNBaseline,
)
from bayes_router.inference.estimators.stl import StickingTheLanding, TraceSTL_ELBO

__all__ = [
    "ESTIMATORS",
    "DReG",
    "DReG_ELBO",
    "DirichletBaselineNet",
    "Estimator",
    "IWAE",
    "NaiveGamma",
    "NeuralBaselineTraceGraph_ELBO",
    "NormalisedGammaDirichlet",
    "RSVI",
    "RSVIDirichlet",
    "ReparamAnalytic",
    "ReparamMC",
    "ScoreBaseline",
    "ScoreFunction",
    "ScoreFunctionDirichlet",
    "ScoreNNBaseline",
    "StickingTheLanding",
    "TraceSTL_ELBO",
    "estimator_names",
    "get_estimator",
]
