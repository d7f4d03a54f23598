"""A gradient-variance study as a run: the lab of :mod:`bayes_router.variance` on a
checkpoint (or a briefly trained model) and on the conjugate toy, written into a folder as
``variance.json``, figures and ``report.md`` (``bayes-router variance``).

In ``variance.json`` every sweep holds, per estimator, a list aligned with its axis
(``particles``, ``beta0_values`` or ``steps``): ``sweep["estimators"][name][i]`` is the point
at ``sweep[axis][i]``, ``{"skipped": reason}`` where it was not measured."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pyro
import torch

from bayes_router.core.options import option
from bayes_router.data.tokens import TokenData, token_data
from bayes_router.experiments.json_files import versions, write_json
from bayes_router.experiments.run_loading import check_run_dir, load_run_dir
from bayes_router.experiments.variance_report import write_lab_outputs
from bayes_router.inference.build import build_routed_lm
from bayes_router.inference.checkpoint import CHECKPOINT_NAME
from bayes_router.inference.train import train
from bayes_router.inference.train_config import TrainConfig
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig
from bayes_router.variance.lm_variance import (
    DEFAULT_PARTICLE_ESTIMATORS,
    DEFAULT_SWEEP_ESTIMATORS,
    check_estimators,
    check_num_draws,
    gradient_variance,
    particles_for,
    variance_vs_beta0,
    variance_vs_particles,
)
from bayes_router.variance.toy_variance import (
    check_num_bootstrap,
    check_particles,
    toy_gradient_variance,
    toy_variance_vs_particles,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# training in segments, measuring between them


def models_along_training(model_cfg, train_cfg, data: TokenData, out_dir: Path, steps,
                          progress: bool):
    """Yield ``(step, model, mean loss of the last 10 steps or None)`` at each of the ascending
    ``steps`` (0: the initialisation). The training loop keeps only its latest checkpoint, so it
    is stopped at each step with ``max_steps`` and resumed from there, which reproduces an
    uninterrupted run exactly."""
    done = 0
    for step in steps:
        if step == 0:
            with pyro.settings.context(module_local_params=True):
                torch.manual_seed(train_cfg.seed)
                model = build_routed_lm(model_cfg, train_cfg)
            yield 0, model, None
            continue
        result = train(model_cfg, train_cfg, data, out_dir=out_dir, resume=done > 0,
                       progress=progress, max_steps=step)
        done = step
        yield step, result.model, float(np.mean([r["loss"] for r in result.history[-10:]]))


def variance_along_training(model_cfg, train_cfg, data: TokenData, out_dir: Path,
                            steps: Sequence[int], *,
                            estimators: Sequence[str] | None = DEFAULT_SWEEP_ESTIMATORS,
                            num_draws: int = 30, batch_seed: int = 0, progress: bool = False,
                            **options) -> dict:
    """Train ``train_cfg`` in segments into ``out_dir`` and run :func:`gradient_variance` at each
    of ``steps`` (step 0 is the initialisation), always on the same training minibatch.

    The training loop keeps only its latest checkpoint, so the run is stopped at each step with
    ``max_steps`` and resumed from it (resuming reproduces an uninterrupted run exactly).

    :returns: ``{"steps": [...], "estimators": {name: [result]}, "train_loss": [...],
        "num_draws", "run_dir"}``, the lists aligned with ``steps``; ``train_loss[i]`` is the
        mean loss of the 10 training steps before ``steps[i]`` (``None`` at step 0).
    :raises ValueError: if ``out_dir`` already holds a checkpoint, or a step exceeds
        ``train_cfg.steps``.
    """
    names = check_estimators(estimators)
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 0 or steps[-1] > train_cfg.steps:
        raise ValueError(f"steps must lie in [0, train_cfg.steps = {train_cfg.steps}], got "
                         f"{steps}")
    out_dir = Path(out_dir)
    if (out_dir / CHECKPOINT_NAME).exists():
        raise ValueError(f"{out_dir} already holds a checkpoint; choose an empty folder")
    x, y = data.sample_batch("train", train_cfg.batch_size, train_cfg.seq_len,
                             torch.Generator().manual_seed(batch_seed))
    dataset_size = data.num_windows("train", train_cfg.seq_len)
    table: dict[str, list] = {name: [] for name in names}
    losses = []
    for _, model, loss in models_along_training(model_cfg, train_cfg, data, out_dir, steps,
                                                 progress):
        losses.append(loss)
        measured = gradient_variance(model, x, y, dataset_size=dataset_size, estimators=names,
                                     num_draws=num_draws, **options)
        for name in names:
            table[name].append(measured["estimators"][name])
    return {"steps": steps, "estimators": table, "train_loss": losses,
            "num_draws": num_draws, "run_dir": str(out_dir)}


# ------------------------------------------------------------------------------------------------
# the whole study into a folder


def _finite(value):
    """JSON-safe copy: non-finite floats become ``None``."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _sequence(name: str, value) -> tuple:
    """``value`` (a list, a tuple or another iterable, not a string) as a tuple."""
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a list or tuple, got {value!r}")
    return tuple(value)


def _check_sweep_estimators(name: str, names: Sequence[str]) -> None:
    try:
        check_estimators(names)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


@dataclass(frozen=True)
class VarianceLabConfig:
    """What the gradient-variance lab (:func:`variance_lab`) measures, and how often.

    :param toy: measure on the conjugate toy instead of the LM (bias against the exact
        gradient), and sweep the particles there
        (:func:`~bayes_router.variance.toy_variance.toy_variance_vs_particles`: power-law
        slopes against ``K``, drawn in ``toy_particles.png``); the ``beta0`` and
        along-training sweeps are the LM's only.
    :param estimators: the estimators of the main table; ``None``: every registered one.
    :param num_draws: ``M`` per estimator (``None``: 50 on the LM, 20000 on the toy).
    :param num_particles: particles per estimate of the main table and the ``beta0`` sweep
        (``None``: each estimator's fewest, 1 or 2).
    :param particles: particle counts of the particle sweep (empty: no sweep).
    :param particle_estimators: the estimators of the particle sweep.
    :param beta0_values: prior concentrations of the ``beta0`` sweep, guide fixed (empty: no
        sweep).
    :param sweep_estimators: the estimators of the ``beta0`` and along-training sweeps.
    :param along_training: training steps at which to measure, training the run's (or the
        small default) configuration afresh in segments into ``out_dir/along-training``
        (empty: no such sweep).
    :param sweep_draws: ``M`` of the sweeps (``None``: ``min(num_draws, 30)``; on the toy
        ``num_draws``).
    :param num_bootstrap: resamples of the draws behind the intervals of the toy's slopes
        (0: none).
    :param train_steps: steps of the small model trained when no checkpoint is given.
    :param seed: seed of the draws, of the minibatch and of the small model.
    """

    toy: bool = option(
        False, "the conjugate toy instead: bias against the exact gradient, and the particle "
        "sweep's power-law slopes in K", switch=True)
    estimators: tuple[str, ...] | None = option(
        None, "comma-separated estimator names (default: all registered)")
    num_draws: int | None = option(
        None, "gradient estimates M per estimator (default 50; toy 20000)", flag="--draws")
    num_particles: int | None = option(
        None, "particles per estimate (default: each estimator's fewest, 1 or 2)")
    particles: tuple[int, ...] = option(
        (1, 2, 4, 8), "particle counts of the particle sweep, on the LM or the toy ('' to skip)")
    particle_estimators: tuple[str, ...] = option(
        DEFAULT_PARTICLE_ESTIMATORS, "estimators of the particle sweep")
    beta0_values: tuple[float, ...] = option(
        (0.1, 1.0, 10.0), "beta0 values of the beta0 sweep, guide fixed ('' to skip)")
    sweep_estimators: tuple[str, ...] = option(
        DEFAULT_SWEEP_ESTIMATORS, "estimators of the beta0 and along-training sweeps")
    along_training: tuple[int, ...] = option(
        (), "training steps at which to measure, training afresh in segments, e.g. "
        "0,50,100,200,300 (default: none)")
    sweep_draws: int | None = option(
        None, "M of the sweeps (default min(draws, 30); toy: draws)")
    num_bootstrap: int = option(
        400, "bootstrap resamples of the draws behind the intervals of the toy sweep's slopes "
        "(0: none)", flag="--bootstrap")
    train_steps: int = option(100, "steps of the small model trained without --checkpoint")
    seed: int = option(0, "seed of the draws (and of the model)")

    def __post_init__(self):
        for name in ("particles", "particle_estimators", "beta0_values", "sweep_estimators",
                     "along_training"):
            object.__setattr__(self, name, _sequence(name, getattr(self, name)))
        if self.estimators is not None:
            object.__setattr__(self, "estimators", _sequence("estimators", self.estimators))
        if not isinstance(self.toy, bool):
            raise TypeError(f"toy must be a bool, got {self.toy!r}")
        names = check_estimators(self.estimators)
        _check_sweep_estimators("particle_estimators", self.particle_estimators)
        _check_sweep_estimators("sweep_estimators", self.sweep_estimators)
        for draws in (self.num_draws, self.sweep_draws):
            if draws is not None:
                check_num_draws(draws)
        if self.num_particles is not None:
            for name in names:
                particles_for(name, self.num_particles)
        if self.particles:
            check_particles(self.particles)
        values = self.beta0_values
        if not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)
                   and v > 0 for v in values):
            raise ValueError(f"beta0_values must be finite numbers > 0, got {list(values)}")
        along = self.along_training
        if not all(isinstance(s, Integral) and not isinstance(s, bool) for s in along):
            raise ValueError(f"along_training steps must be integers, got {list(along)}")
        if along and min(along) < 0:
            raise ValueError(f"along_training steps must be >= 0, got {sorted(set(along))}")
        check_num_bootstrap(self.num_bootstrap)
        steps = self.train_steps
        if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 1:
            raise ValueError(f"train_steps must be >= 1, got {steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


def variance_lab(out_dir: Path, config: VarianceLabConfig, checkpoint: Path | None = None, *,
                 progress: bool = True) -> dict:
    """Run the lab of ``config`` into ``out_dir``: ``variance.json``, figures and
    ``report.md``.

    :param checkpoint: a run directory whose trained model is measured. Without it (and
        without ``config.toy``) a small model is trained here for ``config.train_steps``
        steps first, into ``out_dir/model``.
    :raises ValueError: if ``checkpoint`` is given with ``config.toy``, or the checkpoint
        holds no Bayesian run.
    """
    if config.toy and checkpoint is not None:
        raise ValueError("checkpoint and config.toy exclude each other: the toy has no "
                         "trained model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = check_estimators(config.estimators)
    seed = config.seed
    if config.toy:
        draws = 20000 if config.num_draws is None else config.num_draws
        result = {"mode": "toy", "versions": versions(),
                  "main": toy_gradient_variance(names, num_draws=draws,
                                                num_particles=config.num_particles, seed=seed)}
        if config.particles:
            result["particles"] = toy_variance_vs_particles(
                config.particle_estimators, config.particles,
                num_draws=draws if config.sweep_draws is None else config.sweep_draws,
                num_bootstrap=config.num_bootstrap, seed=seed)
        write_lab_outputs(out_dir, result)
        write_json(out_dir / "variance.json", _finite(result))
        return result

    draws = 50 if config.num_draws is None else config.num_draws
    sweep_draws = min(draws, 30) if config.sweep_draws is None else config.sweep_draws
    if checkpoint is not None:
        run_dir = check_run_dir(Path(checkpoint))
        with pyro.settings.context(module_local_params=True):
            model, model_cfg, train_cfg, payload, data = load_run_dir(run_dir)
        if not isinstance(model, BayesianRoutedLM):
            raise ValueError(f"{run_dir} holds a {train_cfg.router} run; the gradient-variance "
                             "lab needs a Bayesian run")
        source = {"kind": "checkpoint", "run_dir": str(run_dir), "step": int(payload["step"])}
    else:
        model_cfg, train_cfg, data = _default_configs(config.train_steps, seed)
        source = {"kind": "trained here", "run_dir": str(out_dir / "model"),
                  "step": config.train_steps}
    result = {"mode": "lm", "source": source, "versions": versions(),
              "model_config": model_cfg.to_dict(), "train_config": train_cfg.to_dict()}
    along = sorted({int(s) for s in config.along_training})
    if checkpoint is None:
        segments = sorted(set(along) | {config.train_steps})
        measured = _train_default_model(model_cfg, train_cfg, data, out_dir / "model",
                                         segments, along, config.sweep_estimators,
                                         sweep_draws, seed, progress)
        model = measured["model"]
        if along:
            result["along_training"] = measured["along"]
    elif along:
        along_cfg = dataclasses.replace(train_cfg, steps=max(train_cfg.steps, along[-1]))
        result["along_training"] = variance_along_training(
            model_cfg, along_cfg, data, out_dir / "along-training", along,
            estimators=config.sweep_estimators, num_draws=sweep_draws, batch_seed=seed,
            progress=progress, seed=seed)

    x, y = data.sample_batch("train", train_cfg.batch_size, train_cfg.seq_len,
                             torch.Generator().manual_seed(seed))
    dataset_size = data.num_windows("train", train_cfg.seq_len)
    options = dict(dataset_size=dataset_size, seed=seed, progress=progress)
    result["main"] = gradient_variance(model, x, y, estimators=names, num_draws=draws,
                                       num_particles=config.num_particles, **options)
    if config.particles:
        result["particles"] = variance_vs_particles(
            model, x, y, particles=config.particles, estimators=config.particle_estimators,
            num_draws=sweep_draws, **options)
    if config.beta0_values:
        result["beta0"] = variance_vs_beta0(
            model, x, y, beta0_values=config.beta0_values, estimators=config.sweep_estimators,
            num_draws=sweep_draws, num_particles=config.num_particles, **options)
    write_lab_outputs(out_dir, result)
    write_json(out_dir / "variance.json", _finite(result))
    return result


def _default_configs(train_steps: int, seed: int):
    """The small configuration the lab trains when no checkpoint is given."""
    train_cfg = TrainConfig(steps=train_steps, batch_size=8, seq_len=64, eval_every=train_steps,
                            eval_batches=2, checkpoint_every=train_steps, seed=seed,
                            dataset="stdlib", dataset_max_chars=200_000)
    data = token_data("stdlib", max_chars=train_cfg.dataset_max_chars, seed=seed)
    model_cfg = TinyLMConfig(vocab_size=data.vocab_size, d_model=32, n_heads=2, n_layers=2,
                             max_seq_len=64, window=8, chunk_size=16, controller_hidden=32,
                             cost_preset="seed")
    return model_cfg, train_cfg, data


def _train_default_model(model_cfg, train_cfg, data, run_dir: Path, segments, along, names,
                         num_draws, seed, progress) -> dict:
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_NAME).exists():
        raise ValueError(f"{run_dir} already holds a checkpoint; choose an empty --out folder")
    names = check_estimators(names) if along else []
    x, y = data.sample_batch("train", train_cfg.batch_size, train_cfg.seq_len,
                             torch.Generator().manual_seed(seed))
    dataset_size = data.num_windows("train", train_cfg.seq_len)
    table: dict[str, list] = {name: [] for name in names}
    losses, model = [], None
    for step, model, loss in models_along_training(
            model_cfg, train_cfg, data, run_dir, [0] + [s for s in segments if s > 0], progress):
        if step in along and names:
            losses.append(loss)
            measured = gradient_variance(model, x, y, dataset_size=dataset_size,
                                         estimators=names, num_draws=num_draws, seed=seed)
            for name in names:
                table[name].append(measured["estimators"][name])
    along_result = {"steps": along, "estimators": table, "train_loss": losses,
                    "num_draws": num_draws, "run_dir": str(run_dir)} if along else None
    return {"model": model, "along": along_result}


__all__ = ["VarianceLabConfig", "models_along_training", "variance_along_training",
           "variance_lab"]
