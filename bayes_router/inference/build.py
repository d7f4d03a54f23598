"""Routed LMs from configurations: the one a training configuration names
(:func:`build_routed_lm`), one whose LM starts from another run's (:func:`warm_start_lm`), a run's
trained one (:func:`load_lm_from_checkpoint`), and the check that a configuration builds before a
run writes anything (:func:`check_compatible`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pyro
import torch

from bayes_router.inference.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    checkpoint_configs,
    load_checkpoint,
)
from bayes_router.inference.distributed import resolve_device
from bayes_router.inference.estimators import get_estimator
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.prior_free import PriorFreeRoutedLM
from bayes_router.models.routed_lm import RoutedLM
from bayes_router.models.static import StaticRoutedLM

logger = logging.getLogger(__name__)


def build_routed_lm(model_cfg: TinyLMConfig, train_cfg: TrainConfig) -> RoutedLM:
    """The routed LM that ``train_cfg.router`` names, with its prior or temperature."""
    if train_cfg.router == "bayesian":
        return BayesianRoutedLM(model_cfg, beta0=train_cfg.beta0, eta=train_cfg.eta,
                                a_min=train_cfg.a_min,
                                estimator=get_estimator(train_cfg.estimator),
                                beta0_init=train_cfg.beta0_init, prior=train_cfg.prior,
                                prior_mean=train_cfg.prior_mean)
    if train_cfg.router == "prior-free":
        return PriorFreeRoutedLM(model_cfg, tau=train_cfg.tau)
    return StaticRoutedLM(model_cfg, train_cfg.router, seed=train_cfg.seed)


def check_compatible(model_cfg: TinyLMConfig, train_cfg: TrainConfig) -> None:
    """Raise a clear ``ValueError`` for a training configuration the LM cannot take (a static
    router's shares or expert, a Bayesian router with one expert, the seed prior's costs, a
    warm start from an LM of another configuration), before anything is written."""
    with pyro.settings.context(module_local_params=True):
        model = build_routed_lm(model_cfg, train_cfg)
    if train_cfg.warm_start is not None:
        warm_start_lm(model, Path(train_cfg.warm_start))


def warm_start_lm(model: RoutedLM, run_dir: Path) -> None:
    """Load the trained LM (embeddings, blocks, head; not the router) of ``run_dir`` into
    ``model``.

    :raises ValueError: if ``run_dir`` holds no checkpoint, or one of an LM of another
        configuration (vocabulary, size or experts).
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    try:
        payload = load_checkpoint(path)
    except CheckpointError as error:
        raise ValueError(f"warm_start: {error}") from None
    saved, saved_train = checkpoint_configs(payload, path)
    if saved != model.cfg:
        diffs = sorted(k for k, v in saved.to_dict().items() if model.cfg.to_dict()[k] != v)
        raise ValueError(f"warm_start: {run_dir} trained an LM of another configuration "
                         f"(fields {diffs}: {[getattr(saved, k) for k in diffs]} there, "
                         f"{[getattr(model.cfg, k) for k in diffs]} here)")
    lm_state = {k[len("lm."):]: v for k, v in payload["model"].items() if k.startswith("lm.")}
    model.lm.load_state_dict(lm_state)
    logger.info("warm start: the LM of %s (%s router, step %d)", run_dir,
                saved_train.router, payload["step"])


def load_lm_from_checkpoint(run_dir: Path, device: str | torch.device = "cpu",
                            dtype: str | torch.dtype = "float32"
                            ) -> tuple[RoutedLM, TinyLMConfig, TrainConfig, dict]:
    """Rebuild the routed LM of a run directory from its checkpoint, on ``device`` (a
    checkpoint written on any device loads onto any other), computing in ``dtype`` (by
    default full precision, whatever the run trained in: analysis wants exact numbers)."""
    payload = load_checkpoint(Path(run_dir) / CHECKPOINT_NAME)
    model_cfg, train_cfg = checkpoint_configs(payload)
    with pyro.settings.context(module_local_params=True):
        model = build_routed_lm(model_cfg, train_cfg)
        model.load_state_dict(payload["model"])
    model.to(resolve_device(device)).eval()
    model.set_precision(dtype)
    return model, model_cfg, train_cfg, payload
