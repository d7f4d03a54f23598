"""The checkpoint of a training run: its format, the payload a run saves, and the I/O.

A checkpoint is one ``torch.save`` file of tensors and plain containers (it loads with
``weights_only=True``): the format string, the step and elapsed seconds, the model's and the
optimiser's state, the random states (torch's, CUDA's, the batch generator's), the float16 loss
scaler's state, the history and evaluations so far, the world size, and both configurations as
JSON. :func:`save_checkpoint` writes it atomically; :func:`load_checkpoint` refuses anything
else with a :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch

from bayes_router.inference.estimators.base import running_baselines
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.config import TinyLMConfig

CHECKPOINT_FORMAT = "bayes-router-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"


#: The fields every checkpoint of ours holds.
CHECKPOINT_FIELDS = ("format", "step", "seconds", "model", "optimizer", "rng", "batch_rng",
                     "history", "evaluations", "model_config", "train_config")


class CheckpointError(ValueError):
    """A checkpoint that is corrupted, not ours, or from a different configuration."""


def checkpoint_payload(model: torch.nn.Module, optimiser: torch.optim.Optimizer,
                       batch_rng: torch.Generator, result, model_cfg: TinyLMConfig,
                       train_cfg: TrainConfig, world_size: int = 1, scaler=None) -> dict:
    """What a run saves: everything :func:`~bayes_router.inference.train.train` needs to resume
    it bit for bit.

    :param result: the run so far, a :class:`~bayes_router.inference.train.TrainResult` (its
        step, seconds, history and evaluations).
    :param scaler: the float16 loss scaler, or ``None``.
    """
    return {
        "world_size": world_size,
        "scaler": None if scaler is None else scaler.state_dict(),
        "format": CHECKPOINT_FORMAT,
        "step": result.step,
        "seconds": result.seconds,
        "model": model.state_dict(),
        "optimizer": optimiser.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "batch_rng": batch_rng.get_state(),
        "history": result.history,
        "evaluations": result.evaluations,
        "model_config": json.dumps(model_cfg.to_dict()),
        "train_config": json.dumps(train_cfg.to_dict()),
        # score-function estimators' decaying-average baselines (empty for the others)
        "running_baselines": running_baselines(),
    }


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with ``weights_only=True`` and check that it is one of ours, whole.

    :raises CheckpointError: for a missing, unreadable or truncated file, one that holds
        anything but tensors and plain containers (a pickle that ``weights_only`` refuses), one
        of another format, or one that lacks a field or holds configurations that do not parse.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():  # a corrupted file, not a refusal
            raise CheckpointError(f"{path} is not a readable bayes-router checkpoint "
                                  f"(UnpicklingError: {str(error).splitlines()[0]})") from None
        # weights_only refused an object: never load it unsafely
        raise CheckpointError(
            f"{path} holds Python objects besides tensors and plain containers, which a "
            "bayes-router checkpoint never does; it was refused unread (do not load files "
            "you do not trust)") from None
    except Exception as error:  # corrupted, truncated, or not a torch file at all
        raise CheckpointError(f"{path} is not a readable bayes-router checkpoint "
                              f"({type(error).__name__}: {str(error).splitlines()[0]})"
                              ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a bayes-router checkpoint "
                              f"(expected format {CHECKPOINT_FORMAT!r})")
    missing = [name for name in CHECKPOINT_FIELDS if name not in payload]
    if missing:
        raise CheckpointError(f"{path} is an incomplete bayes-router checkpoint: missing "
                              f"{missing}")
    checkpoint_configs(payload, path)
    return payload


def checkpoint_configs(payload: dict, path: Path | str = "checkpoint"
                       ) -> tuple[TinyLMConfig, TrainConfig]:
    """The model and training configurations a checkpoint was written with.

    :raises CheckpointError: if either does not parse or is not a valid configuration.
    """
    try:
        return (TinyLMConfig.from_dict(json.loads(payload["model_config"])),
                TrainConfig.from_dict(json.loads(payload["train_config"])))
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path} holds configurations that do not parse: {error}"
                              ) from None


def check_same_config(payload: dict, model_cfg: TinyLMConfig, train_cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint written under another configuration (``steps`` may grow)."""
    saved_model, saved_train = checkpoint_configs(payload)
    # through the dataclasses, so fields added since the checkpoint was written take defaults
    diffs = config_differences(saved_model, model_cfg, "")
    diffs += [k for k in config_differences(saved_train, train_cfg, "") if k != "steps"]
    if diffs:
        raise CheckpointError(f"checkpoint was written with a different configuration "
                              f"(fields {sorted(diffs)}); start a new run directory instead")


def config_differences(a, b, prefix: str) -> list[str]:
    """Fields (as ``prefix + name``) in which two configurations differ, compared as JSON."""
    a, b = json.loads(json.dumps(a.to_dict())), json.loads(json.dumps(b.to_dict()))
    return sorted(prefix + k for k in set(a) | set(b) if a.get(k) != b.get(k))

