"""Inference: the SVI training loop, evaluation, generation with per-expert caches, ELBO
estimators, empirical Bayes for beta0, and step timing. The gradient-variance lab and the
conjugate toys are :mod:`bayes_router.variance`, a layer above."""

from bayes_router.core.dirichlet import expected_log_alpha
from bayes_router.inference.build import build_routed_lm, load_lm_from_checkpoint
from bayes_router.inference.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bayes_router.inference.decoding import DecodeConfig, Generation, generate
from bayes_router.inference.estimators import Estimator, estimator_names, get_estimator
from bayes_router.inference.evaluate import (
    collect_batch_outputs,
    evaluate,
    routing_metrics,
    timed_decode,
    timed_forward,
)
from bayes_router.inference.minka import (
    fit_dirichlet,
    fit_precision,
    fit_precision_from_samples,
)
from bayes_router.inference.objective import loss_and_surrogate
from bayes_router.inference.train import TrainingDiverged, TrainResult, train
from bayes_router.inference.train_config import TrainConfig

__all__ = [
    "CheckpointError",
    "DecodeConfig",
    "Estimator",
    "Generation",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "build_routed_lm",
    "collect_batch_outputs",
    "estimator_names",
    "evaluate",
    "expected_log_alpha",
    "fit_dirichlet",
    "fit_precision",
    "fit_precision_from_samples",
    "generate",
    "get_estimator",
    "load_checkpoint",
    "load_lm_from_checkpoint",
    "loss_and_surrogate",
    "routing_metrics",
    "save_checkpoint",
    "timed_decode",
    "timed_forward",
    "train",
]
