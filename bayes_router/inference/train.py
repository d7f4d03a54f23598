"""The SVI training loop shared by the Bayesian router and the prior-free baseline.

``Trace_ELBO``-style objectives run as ``loss = objective(model, guide, x, y)`` with a torch
optimiser over the module's parameters (``pyro.settings`` ``module_local_params=True``: no global
parameter store). The loop anneals the KL term, clips gradients, moves the soft-to-hard gate
threshold, validates periodically, writes atomic checkpoints
(:mod:`~bayes_router.inference.checkpoint`) and resumes from them, and stops a diverging run at
the failing step while keeping the last good checkpoint. The run's configuration is
:class:`~bayes_router.inference.train_config.TrainConfig`; the model it trains comes from
:func:`~bayes_router.inference.build.build_routed_lm`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from pyro.infer import ELBO
from tqdm.auto import tqdm

from bayes_router.core.optim import adamw
from bayes_router.core.precision import gradient_scaler, resolve_dtype
from bayes_router.data.tokens import TokenData
from bayes_router.inference.build import build_routed_lm, warm_start_lm
from bayes_router.inference.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    check_same_config,
    checkpoint_payload,
    load_checkpoint,
    save_checkpoint,
)
from bayes_router.inference.distributed import Distributed, resolve_device, shard, shard_seed
from bayes_router.inference.estimators import Estimator, get_estimator
from bayes_router.inference.estimators.base import restore_running_baselines
from bayes_router.inference.evaluate import bits_label, evaluate
from bayes_router.inference.objective import (
    AuxiliaryOptimiser,
    FreeBitsELBO,
    StepOptions,
    StepResult,
    objective_terms,
    svi_step,
)
from bayes_router.inference.train_config import TrainConfig, gated_training_bias
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.routed_lm import RoutedLM

logger = logging.getLogger(__name__)

#: A negative ELBO per token below this is impossible for a categorical likelihood (its NLL and
#: KL are >= 0; single-sample estimates of the KL may dip a little below 0): divergence.
IMPOSSIBLE_LOSS = -1.0
#: A loss per token above this many times the run's first loss (itself at least 1 nat) is an
#: explosion: no working run climbs three orders of magnitude above where it started (KL
#: annealing and free bits raise it by small factors at most).
EXPLOSION_FACTOR = 1e3
#: Consecutive float16 overflows (skipped steps, each halving the loss scale) that stop a run.
MAX_OVERFLOWS = 25


class TrainingDiverged(RuntimeError):
    """Training diverged: carries the step, the quantity that failed (``"loss"``, ``"gradient
    norm"``, ``"parameters"``, ``"distribution parameters"``), its value and the last good
    (checked finite) checkpoint."""

    def __init__(self, step: int, loss: float, checkpoint: Path | None,
                 quantity: str = "loss", detail: str = ""):
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        self.quantity, self.detail = quantity, detail
        kept = (f"; the last good checkpoint is {checkpoint}" if checkpoint
                else "; no good checkpoint was written")
        what = f"{quantity} = {loss}" if detail == "" else f"{quantity}: {detail}"
        super().__init__(f"training diverged at step {step}: {what}{kept}")


def _non_finite_state(model, optimiser) -> str | None:
    """The first parameter or optimiser state tensor that is not finite, or ``None``.

    Every step pays one fused norm over all of them (a non-finite entry makes its tensor's norm
    non-finite); only a failure walks them one by one for the name."""
    states = [v for state in optimiser.state.values() for v in state.values() if torch.is_tensor(v)]
    tensors = [p.detach() for p in model.parameters()] + states
    if bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
        return None
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            return f"parameter {name}"
    for group, state in enumerate(optimiser.state.values()):
        for key, value in state.items():
            if torch.is_tensor(value) and not bool(torch.isfinite(value).all()):
                return f"optimiser state {key} of parameter {group}"
    return "a norm of the parameters or optimiser state"  # finite entries, overflowing norm


def _divergence(step: int, outcome: StepResult, overflows: int, first_loss: float, model,
                optimiser, scaler, last_good: Path | None) -> TrainingDiverged | None:
    """How step ``step`` diverged, or ``None``; the checks in order: a loss or gradient norm
    that is not finite, :data:`MAX_OVERFLOWS` float16 overflows in a row, a loss below
    :data:`IMPOSSIBLE_LOSS`, a loss over :data:`EXPLOSION_FACTOR` times the first step's
    (``first_loss``), parameters or optimiser state that are not finite after the update.

    :param overflows: the consecutive float16 overflows up to this step (with ``scaler``).
    :param last_good: the last good checkpoint, which the error names.
    """
    if outcome.failed is not None:
        value = outcome.loss if outcome.failed == "loss" else outcome.grad_norm
        return TrainingDiverged(step, value, last_good, outcome.failed)
    if overflows >= MAX_OVERFLOWS:
        return TrainingDiverged(step, outcome.grad_norm, last_good, "gradient norm",
                                f"{overflows} float16 overflows in a row (loss scale now "
                                f"{scaler.get_scale():.3g}): the gradients are not finite at "
                                f"any scale")
    if outcome.loss < IMPOSSIBLE_LOSS:
        return TrainingDiverged(step, outcome.loss, last_good, "loss",
                                f"{outcome.loss:.4g} nats/token, impossible for a "
                                "categorical likelihood (its NLL and KL are >= 0)")
    if outcome.loss > EXPLOSION_FACTOR * max(first_loss, 1.0):
        return TrainingDiverged(step, outcome.loss, last_good, "loss",
                                f"{outcome.loss:.4g} nats/token, over {EXPLOSION_FACTOR:g} x "
                                f"the first step's {first_loss:.4g}: the run exploded")
    broken = _non_finite_state(model, optimiser)
    if broken is not None:
        return TrainingDiverged(step, math.nan, last_good, "parameters",
                                f"{broken} is not finite after the update")
    return None


def make_objective(train_cfg: TrainConfig) -> tuple[Estimator, ELBO]:
    """The configured estimator and its ELBO object (routers without latents have the
    log-likelihood as their ELBO, computed by ``reparam-mc``'s ``Trace_ELBO``); free bits wrap
    the analytic KL (:class:`~bayes_router.inference.objective.FreeBitsELBO`)."""
    bayesian = train_cfg.router == "bayesian"
    estimator = get_estimator(train_cfg.estimator if bayesian else "reparam-mc")
    particles = train_cfg.num_particles if bayesian else 1
    if bayesian and train_cfg.free_bits > 0:
        return estimator, FreeBitsELBO(train_cfg.free_bits, num_particles=particles,
                                       vectorize_particles=True, max_plate_nesting=1)
    return estimator, estimator.make_elbo(num_particles=particles, vectorize_particles=True,
                                          max_plate_nesting=1)


@dataclass
class TrainResult:
    """What a finished (or resumed) run returns: the model and its loss trace."""

    model: RoutedLM
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    step: int = 0
    seconds: float = 0.0


def _resume(path: Path | None, model: RoutedLM, optimiser: torch.optim.Optimizer,
            batch_rng: torch.Generator, scaler, model_cfg: TinyLMConfig, train_cfg: TrainConfig,
            world_size: int) -> TrainResult:
    """Restore the run checkpointed at ``path`` into the freshly built ``model``, ``optimiser``,
    random states and loss ``scaler`` (``None`` unless float16), and return its progress.

    :raises ValueError: without a ``path``.
    :raises CheckpointError: for a checkpoint that is not ours, or one of another configuration
        or another number of processes.
    """
    if path is None:
        raise ValueError("resume needs an output directory holding a checkpoint")
    payload = load_checkpoint(path)
    check_same_config(payload, model_cfg, train_cfg)
    saved_world = payload.get("world_size", 1)
    if saved_world != world_size:
        raise CheckpointError(
            f"{path} was written by a run on {saved_world} process(es), this one has "
            f"{world_size}: resume with the same number (the shards' random streams depend "
            f"on it)")
    model.load_state_dict(payload["model"])
    optimiser.load_state_dict(payload["optimizer"])  # follows the parameters' device
    torch.set_rng_state(payload["rng"])
    if payload.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    batch_rng.set_state(payload["batch_rng"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    # checkpoints written before the baselines were saved restart them
    restore_running_baselines(payload.get("running_baselines", {}),
                              next(model.parameters()).device)
    result = TrainResult(model, history=list(payload["history"]),
                         evaluations=list(payload["evaluations"]), step=int(payload["step"]),
                         seconds=float(payload["seconds"]))
    logger.info("resumed from %s at step %d", path, result.step)
    return result


def train(model_cfg: TinyLMConfig, train_cfg: TrainConfig, data: TokenData,
          out_dir: Path | None = None, resume: bool = False, progress: bool = True,
          max_steps: int | None = None, device: str | torch.device | None = "cpu",
          distributed: Distributed | None = None) -> TrainResult:
    """Fit the routed LM by SVI on ``data`` (a :class:`~bayes_router.data.tokens.TokenData`).

    :param out_dir: where checkpoints go (``None``: no checkpoints).
    :param resume: continue from ``out_dir/checkpoint.pt`` (same configuration required).
    :param max_steps: stop after this step even if ``train_cfg.steps`` is larger (used to
        interrupt a run in tests; the schedules still follow ``train_cfg.steps``).
    :param device: where the model and every batch live (see
        :func:`~bayes_router.inference.distributed.resolve_device`; ``"auto"``: CUDA if any).
    :param distributed: the process group of a data-parallel run (``None``: the one torchrun
        describes, or a single process). Every rank draws the same global batch and trains on
        its share; rank 0 alone evaluates, logs and writes checkpoints.
    """
    if data.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the corpus has {data.vocab_size} token ids but vocab_size is "
                         f"{model_cfg.vocab_size}")
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len ({train_cfg.seq_len}) must be <= max_seq_len "
                         f"({model_cfg.max_seq_len})")
    checkpoint_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    device = resolve_device(device)
    group = Distributed.from_environment(device) if distributed is None else distributed
    shards = group.world_size * train_cfg.micro_batches
    if train_cfg.batch_size % shards:
        raise ValueError(f"batch_size ({train_cfg.batch_size}) must be divisible by the world "
                         f"size x micro_batches ({group.world_size} x "
                         f"{train_cfg.micro_batches}): every shard takes an equal share")
    group.check_same(json.dumps([model_cfg.to_dict(), train_cfg.to_dict()], sort_keys=True),
                     "the configuration")
    bias = gated_training_bias(train_cfg)
    if bias is not None and group.is_main:
        logger.warning(bias)
    with pyro.settings.context(module_local_params=True):
        torch.manual_seed(train_cfg.seed)
        model = build_routed_lm(model_cfg, train_cfg).to(device)
        model.set_precision(train_cfg.dtype)
        scaler = gradient_scaler(device, resolve_dtype(train_cfg.dtype))
        optimiser = adamw(model.parameters(), lr=train_cfg.lr,
                          weight_decay=train_cfg.weight_decay)
        estimator, objective = make_objective(train_cfg)
        auxiliary = AuxiliaryOptimiser(estimator, objective, lr=train_cfg.lr)
        batch_rng = torch.Generator().manual_seed(train_cfg.seed)
        if resume:
            result = _resume(checkpoint_path, model, optimiser, batch_rng, scaler, model_cfg,
                             train_cfg, group.world_size)
        else:
            result = TrainResult(model)
            restore_running_baselines({})  # not another run's, left in this process
            if train_cfg.warm_start is not None:
                warm_start_lm(model, Path(train_cfg.warm_start))
        options = StepOptions(dataset_size=data.num_windows("train", train_cfg.seq_len),
                              grad_clip=train_cfg.grad_clip, auxiliary=auxiliary,
                              micro_batches=train_cfg.micro_batches,
                              distributed=group if group.active else None, scaler=scaler)
        last_good = checkpoint_path if resume else None  # never a stale file of another run
        stop = train_cfg.steps if max_steps is None else min(train_cfg.steps, max_steps)
        bar = tqdm(total=stop, initial=result.step, disable=not progress or not group.is_main,
                   desc=model.kind, dynamic_ncols=True)
        start = time.perf_counter() - result.seconds
        overflows = 0  # consecutive float16 overflows (steps the loss scaler skipped)
        while result.step < stop:
            step = result.step + 1
            model.train()
            gate_threshold = train_cfg.gate_threshold(step)
            x, y = data.sample_batch("train", train_cfg.batch_size, train_cfg.seq_len, batch_rng)
            x, y = (shard(t, group.rank, group.world_size).to(device) for t in (x, y))
            kl_scale = train_cfg.kl_scale(step)
            seeds = None if shards == 1 else [
                shard_seed(train_cfg.seed, step, group.rank * train_cfg.micro_batches + i)
                for i in range(train_cfg.micro_batches)]
            try:
                outcome = svi_step(objective, model, x, y, optimiser, options, seeds=seeds,
                                   kl_scale=kl_scale, gate_threshold=gate_threshold)
            except ValueError as error:
                # torch's argument validation of a distribution built from diverged parameters
                if not str(error).startswith("Expected parameter"):
                    raise
                bar.close()
                raise TrainingDiverged(step, math.nan, last_good, "distribution parameters",
                                       str(error).split("\n")[0]) from error
            overflows = overflows + 1 if outcome.overflow else 0
            first_loss = result.history[0]["loss"] if result.history else outcome.loss
            diverged = _divergence(step, outcome, overflows, first_loss, model, optimiser,
                                   scaler, last_good)
            if diverged is not None:
                bar.close()
                raise diverged
            per_token, grad_norm = outcome.loss, outcome.grad_norm
            result.step = step
            record = {"step": step, "loss": per_token, "grad_norm": float(grad_norm),
                      "kl_scale": kl_scale, "gate_threshold": gate_threshold}
            if scaler is not None:
                record.update(loss_scale=scaler.get_scale(), overflow=outcome.overflow)
            if group.is_main and (step % train_cfg.log_every == 0 or step == 1 or step == stop):
                record.update(objective_terms(model, x, y))
            if isinstance(model, BayesianRoutedLM) and model.learn_beta0:
                record["beta0"] = model.beta0.detach().tolist()
            result.history.append(record)
            postfix = {"loss": f"{per_token:.3f}"}
            evaluating = step % train_cfg.eval_every == 0 or step == train_cfg.steps
            metrics, failed = None, None
            if group.is_main and evaluating:
                try:
                    metrics = evaluate(model, data, "val", train_cfg.seq_len,
                                       max_batches=train_cfg.eval_batches)
                except Exception as error:  # the other ranks must not wait on this one
                    failed = error
            if evaluating:
                group.agree(failed, f"the evaluation of step {step}")
            if metrics is not None:
                metrics["step"] = step
                result.evaluations.append(metrics)
                label = "val_bpc" if metrics["bits_unit"] == "character" else "val_bits"
                postfix[label] = f"{metrics['val_bpc']:.3f}"
                postfix["share"] = "/".join(f"{s:.2f}" for s in metrics["expert_share_mean"])
                logger.info("step %d: loss %.4f, val %s %.4f", step, per_token,
                            bits_label(metrics), metrics["val_bpc"])
            bar.set_postfix(postfix)
            bar.update(1)
            result.seconds = time.perf_counter() - start
            if checkpoint_path is not None and (step % train_cfg.checkpoint_every == 0
                                                or step == stop):
                failed = None
                if group.is_main:
                    try:
                        save_checkpoint(checkpoint_path, checkpoint_payload(
                            model, optimiser, batch_rng, result, model_cfg, train_cfg,
                            group.world_size, scaler))
                    except Exception as error:  # e.g. a full disk: every rank stops
                        failed = error
                # also the barrier: no rank runs ahead of the checkpoint it would resume from
                group.agree(failed, f"the checkpoint of step {step}")
                last_good = checkpoint_path
        bar.close()
    return result
