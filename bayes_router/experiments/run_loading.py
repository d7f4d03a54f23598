"""Loading a run directory back: its trained model, configurations, checkpoint and data.

A run directory is what :func:`~bayes_router.experiments.training_runs.train_run` writes. The
checkpoint is the source of truth; ``config.json`` is read to warn when it disagrees and to find
the corpus the run trained on.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from bayes_router.data.tokens import TokenData, token_data
from bayes_router.experiments.json_files import read_json
from bayes_router.inference.build import load_lm_from_checkpoint
from bayes_router.inference.checkpoint import CHECKPOINT_NAME, config_differences
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.routed_lm import RoutedLM

logger = logging.getLogger(__name__)

RUN_FILES = ("config.json", CHECKPOINT_NAME, "metrics.json")


def load_data(train_cfg: TrainConfig, model_cfg: TinyLMConfig | None = None) -> TokenData:
    """The corpus a training configuration names (synthetic tasks sized to the run)."""
    options = {}
    if train_cfg.dataset.startswith("synthetic:"):
        options = {"seq_len": train_cfg.seq_len}
        if model_cfg is not None:
            options["window"] = model_cfg.window
    return token_data(train_cfg.dataset, max_chars=train_cfg.dataset_max_chars,
                      seed=train_cfg.seed, **options)


def load_run_dir(run_dir: Path, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32"
                 ) -> tuple[RoutedLM, TinyLMConfig, TrainConfig, dict, TokenData]:
    """The trained model of a run directory (computing in ``dtype``, see
    :func:`~bayes_router.inference.build.load_lm_from_checkpoint`), its configurations,
    checkpoint and data.

    The checkpoint is the source of truth; a warning says when ``config.json`` disagrees with
    it (a checkpoint copied in from another run) or when the corpus has changed since training
    (its fingerprint differs). A run trained on a relative ``--corpus`` path finds it through
    the resolved path it recorded, from any working directory.
    """
    run_dir = Path(run_dir)
    model, model_cfg, train_cfg, payload = load_lm_from_checkpoint(run_dir, device, dtype)
    config = {}
    try:
        config = read_json(run_dir / "config.json")
        saved_model, saved_train = read_config_json(run_dir, config)
        differ = (config_differences(saved_model, model_cfg, "model.")
                  + [k for k in config_differences(saved_train, train_cfg, "train.")
                     if k != "train.steps"])
        if differ:
            logger.warning("%s: the checkpoint disagrees with config.json in %s (a checkpoint "
                           "of another run?); using the checkpoint's configuration", run_dir,
                           differ)
    except (OSError, ValueError) as error:
        logger.warning("%s: config.json cannot be used (%s); using the checkpoint's "
                       "configuration", run_dir, error)
    recorded = config.get("corpus_path")
    if recorded and Path(recorded).exists():  # the file it trained on, from any directory
        train_cfg = dataclasses.replace(train_cfg, dataset=recorded)
    data = load_data(train_cfg, model_cfg)
    if config.get("corpus_sha256") and config["corpus_sha256"] != data.fingerprint():
        logger.warning("%s: the corpus %s has changed since this run was trained on it (its "
                       "fingerprint differs); the results describe the data as it is now",
                       run_dir, train_cfg.dataset)
    return model, model_cfg, train_cfg, payload, data


def check_run_dir(run_dir: Path) -> Path:
    """The run directory if it holds every file an analysis needs, else a clear error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    missing = [name for name in RUN_FILES if not (run_dir / name).exists()]
    if missing:
        raise ValueError(f"{run_dir} is not a finished run directory: missing {missing} "
                         "(train one with `bayes-router train --out DIR`)")
    return run_dir


def read_config_json(run_dir: Path, config: dict | None = None
                     ) -> tuple[TinyLMConfig, TrainConfig]:
    """The model and training configurations of a run's ``config.json`` (``config``: its
    contents, when the caller has read them already).

    :raises ValueError: naming the file, if it does not parse or lacks a valid ``model`` or
        ``train`` configuration.
    """
    path = Path(run_dir) / "config.json"
    config = read_json(path, dict) if config is None else config
    parts = []
    for key, cls in (("model", TinyLMConfig), ("train", TrainConfig)):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"{path} is not a run configuration: its {key!r} entry should be "
                             f"an object of {cls.__name__} fields, got {config.get(key)!r}")
        try:
            parts.append(cls.from_dict(config[key]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: invalid {key!r} configuration: {error}") from None
    return parts[0], parts[1]
