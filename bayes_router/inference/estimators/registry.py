"""The registry of ELBO gradient estimators, by name."""

from __future__ import annotations

from bayes_router.inference.estimators.base import Estimator
from bayes_router.inference.estimators.dreg import DReG
from bayes_router.inference.estimators.iwae import IWAE
from bayes_router.inference.estimators.naive_gamma import NaiveGamma
from bayes_router.inference.estimators.reparam_analytic import ReparamAnalytic
from bayes_router.inference.estimators.reparam_mc import ReparamMC
from bayes_router.inference.estimators.rsvi import RSVI
from bayes_router.inference.estimators.score import ScoreFunction
from bayes_router.inference.estimators.score_baseline import ScoreBaseline
from bayes_router.inference.estimators.score_nn_baseline import ScoreNNBaseline
from bayes_router.inference.estimators.stl import StickingTheLanding

ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls
    for cls in (ReparamMC, ReparamAnalytic, ScoreFunction, ScoreBaseline, ScoreNNBaseline,
                StickingTheLanding, NaiveGamma, RSVI, IWAE, DReG)
}


def estimator_names() -> tuple[str, ...]:
    """Names of the registered estimators, in registry order."""
    return tuple(ESTIMATORS)


def get_estimator(name: str | Estimator, **options) -> Estimator:
    """Build the estimator registered under ``name``.

    :param name: a registry name (see :func:`estimator_names`); an :class:`Estimator`
        instance is returned unchanged (then no ``options`` are allowed).
    :param options: constructor options of the estimator (e.g. ``boost`` for ``rsvi``).
    :raises ValueError: for an unknown name, listing the valid ones.
    """
    if isinstance(name, Estimator):
        if options:
            raise ValueError("options cannot be applied to an already built estimator")
        return name
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; valid names: "
                         f"{', '.join(estimator_names())}")
    return ESTIMATORS[name](**options)
