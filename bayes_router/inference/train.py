"""The SVI training loop shared by the Bayesian router and the prior-free baseline.

``Trace_ELBO``-style objectives run as ``loss = objective(model, guide, x, y)`` with a torch
optimiser over the module's parameters (``pyro.settings`` ``module_local_params=True``: no global
parameter store). The loop anneals the KL term, clips gradients, moves the soft-to-hard gate
threshold, validates periodically, writes atomic checkpoints and resumes from them, and stops a
diverging run at the failing step while keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import tempfile
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
from bayes_router.inference.distributed import Distributed, resolve_device, shard, shard_seed
from bayes_router.inference.estimators import Estimator, estimator_names, get_estimator
from bayes_router.inference.evaluate import bits_label, evaluate
from bayes_router.inference.objective import (
    AuxiliaryOptimiser,
    FreeBitsELBO,
    objective_terms,
    svi_step,
)
from bayes_router.models.bayesian import (
    PRIOR_MEANS,
    PRIORS,
    BayesianRoutedLM,
    PriorFreeRoutedLM,
    RoutedLM,
)
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.static import STATIC_KINDS, StaticRoutedLM

logger = logging.getLogger(__name__)

ROUTERS = ("bayesian", "prior-free")
CHECKPOINT_FORMAT = "bayes-router-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"


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


class CheckpointError(ValueError):
    """A checkpoint that is corrupted, not ours, or from a different configuration."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run besides the LM configuration.

    :param router: ``"bayesian"`` or ``"prior-free"``.
    :param estimator: ELBO estimator name (see :func:`~bayes_router.inference.estimator_names`).
    :param num_particles: vectorised particles per step.
    :param beta0: prior concentration, a positive number, one per layer, or ``"learn"``.
    :param kl_anneal_steps: the KL weight rises linearly from ``kl_anneal_start`` to 1 over these.
    :param kl_weight: a constant factor on the KL term after annealing (beta-VAE style ablation).

        .. warning:: with ``kl_weight != 1`` the objective is no longer the ELBO.
    :param gate_final: final soft-to-hard gate threshold on the normalised routing entropy of
        the sampled weights (0 disables gating); it rises linearly from 0 between
        ``gate_start`` and ``gate_end`` (fractions of training).

        .. warning:: the gated objective is still an ELBO, but with a pathwise (reparameterised)
            estimator its gradient estimate is **biased** (:func:`gated_training_bias`); the
            score-function estimators stay unbiased.
    :param dataset: corpus spec: ``"stdlib"``, a path, or ``"synthetic:<task>"``.
    :param router: ``"bayesian"``, ``"prior-free"``, or a static baseline ``"fixed:<expert>"``,
        ``"fixed:<shares>"``, ``"soft:<shares>"`` (:mod:`bayes_router.models.static`).
    :param prior: the Bayesian router's prior, ``"power"`` or ``"seed"``
        (:class:`~bayes_router.models.bayesian.BayesianRoutedLM`).
    :param prior_mean: ``"fixed"`` or ``"learn"`` (type-II ML of a per-layer prior mean).
    :param free_bits: ``lambda >= 0``: every token's KL per layer counts as
        ``max(KL, lambda)`` (Kingma et al. 2016), so a token may commit up to ``lambda`` nats
        for free. Needs ``reparam-analytic``.

        .. warning:: with ``free_bits > 0`` the objective is not an ELBO.
    :param warm_start: a run directory whose trained LM (not its router) initialises this
        run's LM; the second stage is an ELBO again.
    :param log_every: steps between the objective's logged terms (NLL, KL per layer, ...).
    :param eval_batches: validation batches per periodic evaluation (``None``: the whole split).
    :param micro_batches: shards of each batch whose gradients are averaged (gradient
        accumulation). With ``N`` processes each process takes ``batch_size / N`` sequences in
        ``micro_batches`` shards; whenever a step has more than one shard, shard ``g`` draws its
        noise from its own seed, so a run on ``N`` processes equals a run on one process with
        ``N`` times the micro-batches (tested; not for ``score-baseline`` and
        ``score-nn-baseline``, whose baselines the processes average after every step instead
        of updating them shard after shard). ``batch_size`` is always the global batch.
    :param dtype: the LM's compute dtype under autocast, ``float32``, ``bfloat16`` or
        ``float16`` (with dynamic loss scaling); the routing maths stay in full precision (see
        :mod:`bayes_router.core.precision`).
    """

    router: str = "bayesian"
    prior: str = "power"
    prior_mean: str = "fixed"
    estimator: str = "reparam-analytic"
    num_particles: int = 1
    beta0: float | tuple[float, ...] | str = 1.0
    beta0_init: float = 1.0
    eta: float = 1.0
    a_min: float = 0.05
    tau: float = 1.0
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_anneal_steps: int = 0
    kl_anneal_start: float = 0.0
    kl_weight: float = 1.0
    free_bits: float = 0.0
    warm_start: str | None = None
    gate_final: float = 0.0
    gate_start: float = 0.5
    gate_end: float = 0.9
    eval_every: int = 100
    eval_batches: int | None = 8
    log_every: int = 10
    micro_batches: int = 1
    dtype: str = "float32"
    checkpoint_every: int = 100
    seed: int = 0
    dataset: str = "stdlib"
    dataset_max_chars: int | None = 1_000_000

    def __post_init__(self):
        if isinstance(self.beta0, list):
            object.__setattr__(self, "beta0", tuple(self.beta0))
        if self.router not in ROUTERS and self.router.partition(":")[0] not in STATIC_KINDS:
            raise ValueError(f"router must be one of {ROUTERS} or a static baseline "
                             f"'fixed:<expert>', 'fixed:<shares>', 'soft:<shares>'; got "
                             f"{self.router!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.prior_mean not in PRIOR_MEANS:
            raise ValueError(f"prior_mean must be one of {PRIOR_MEANS}, got {self.prior_mean!r}")
        if self.prior == "seed" and self.prior_mean == "learn":
            raise ValueError("prior_mean 'learn' needs prior 'power' (the seed prior has no "
                             "separate mean)")
        if not (math.isfinite(self.free_bits) and self.free_bits >= 0):
            raise ValueError(f"free_bits must be a finite number >= 0, got {self.free_bits!r}")
        if self.free_bits > 0 and self.estimator != "reparam-analytic":
            raise ValueError(f"free_bits needs the analytic KL: estimator must be "
                             f"'reparam-analytic', got {self.estimator!r}")

        if self.estimator not in estimator_names():
            raise ValueError(f"estimator must be one of {estimator_names()}, got "
                             f"{self.estimator!r}")
        if self.eval_batches is not None and (not isinstance(self.eval_batches, int)
                                              or self.eval_batches < 1):
            raise ValueError(f"eval_batches must be an integer >= 1 or None (the whole split), "
                             f"got {self.eval_batches!r}")
        for name in ("num_particles", "steps", "batch_size", "seq_len", "eval_every",
                     "log_every", "checkpoint_every", "micro_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.beta0, str):
            if self.beta0 != "learn":
                raise ValueError(f"beta0 must be > 0, a list of values > 0, or 'learn'; got "
                                 f"{self.beta0!r}")
        else:
            values = self.beta0 if isinstance(self.beta0, tuple) else (self.beta0,)
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"beta0 must be > 0, got {self.beta0!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed < 2 ** 63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for name in ("beta0_init", "a_min", "tau", "lr", "grad_clip", "kl_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.lr > 1e3:
            raise ValueError(f"lr must be <= 1000 (a learning rate beyond that only overflows), "
                             f"got {self.lr!r}")
        resolve_dtype(self.dtype)  # a ValueError naming the allowed values
        if self.batch_size % self.micro_batches:
            raise ValueError(f"micro_batches ({self.micro_batches}) must divide batch_size "
                             f"({self.batch_size})")
        if self.kl_anneal_steps < 0 or not 0 <= self.kl_anneal_start <= 1:
            raise ValueError("kl_anneal_steps must be >= 0 and kl_anneal_start in [0, 1]")
        if not 0 <= self.gate_final <= 1 or not 0 <= self.gate_start <= self.gate_end <= 1:
            raise ValueError("gate_final must be in [0, 1] and 0 <= gate_start <= gate_end <= 1")
        if not isinstance(self.dataset, str) or self.dataset.strip() == "":
            raise ValueError(f"dataset must be 'stdlib', 'synthetic:<task>' or a text file or "
                             f"folder, got {self.dataset!r}")
        if self.dataset_max_chars is not None and self.dataset_max_chars < 1:
            raise ValueError(f"dataset_max_chars must be >= 1 or None, got "
                             f"{self.dataset_max_chars}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if set(data) - known:
            raise ValueError(f"TrainConfig: unknown fields {sorted(set(data) - known)}")
        return cls(**data)

    def kl_scale(self, step: int) -> float:
        if self.kl_anneal_steps == 0:
            return self.kl_weight
        frac = min(1.0, step / self.kl_anneal_steps)
        return self.kl_weight * (self.kl_anneal_start + (1.0 - self.kl_anneal_start) * frac)

    def gate_threshold(self, step: int) -> float:
        if self.gate_final == 0:
            return 0.0
        frac = step / self.steps
        if frac <= self.gate_start:
            return 0.0
        if self.gate_end == self.gate_start or frac >= self.gate_end:
            return self.gate_final
        return self.gate_final * (frac - self.gate_start) / (self.gate_end - self.gate_start)


def gated_training_bias(train_cfg: TrainConfig) -> str | None:
    """Why this configuration's gradient estimates are biased by training-time gating, or None.

    Gating routes a sampled ``alpha`` hard to its argmax where its normalised entropy is below
    the threshold, so the likelihood jumps where a sample crosses the threshold. The objective
    stays an ELBO (gating is a deterministic function of the sample, the same in model and
    guide), but a pathwise gradient differentiates the integrand sample by sample and misses
    the jumps. On the two-expert toy of ``tests/inference/test_gated_gradient.py`` (gate at
    0.6) the exact gradient is (-0.030, 0.272) and every pathwise estimator averages about
    (-0.27, 0.23) over 20k draws (|z| 6-75), while the score-function estimators, which never
    differentiate the likelihood, stay unbiased (``score-baseline``: (-0.029, 0.245)).
    The toolkit keeps the discontinuous gate (it is the paper's soft-to-hard transition and
    keeps the objective an ELBO) and says so: :func:`train` logs this message and run
    directories record it as ``gradient_bias``.
    """
    if train_cfg.router != "bayesian" or train_cfg.gate_final == 0:
        return None
    if not get_estimator(train_cfg.estimator).pathwise:
        return None
    return (f"training-time gating (gate_final={train_cfg.gate_final}) makes the pathwise "
            f"estimator {train_cfg.estimator!r} biased: its gradient misses the likelihood's "
            "jumps where a sampled alpha crosses the gate threshold (the objective is still an "
            "ELBO); use a score-function estimator (score, score-baseline, score-nn-baseline) "
            "for unbiased gradients")


def check_compatible(model_cfg: TinyLMConfig, train_cfg: TrainConfig) -> None:
    """Raise a clear ``ValueError`` for a training configuration the LM cannot take (a static
    router's shares or expert, a Bayesian router with one expert, the seed prior's costs, a
    warm start from an LM of another configuration), before anything is written."""
    with pyro.settings.context(module_local_params=True):
        model = build_routed_lm(model_cfg, train_cfg)
    if train_cfg.warm_start is not None:
        warm_start_lm(model, Path(train_cfg.warm_start))


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


def objective_label(train_cfg: TrainConfig) -> str:
    """``"ELBO"`` or ``"not an ELBO (<why>)"``: what the training objective is, for reports."""
    if train_cfg.router != "bayesian":
        return "ELBO (the log-likelihood: this router has no latent variables)"
    reasons = []
    if train_cfg.kl_weight != 1:
        reasons.append(f"KL weight {train_cfg.kl_weight}")
    if train_cfg.free_bits > 0:
        reasons.append(f"free bits {train_cfg.free_bits} nats per token and layer")
    if reasons:
        return f"not an ELBO ({'; '.join(reasons)})"
    if train_cfg.kl_anneal_steps:
        return f"ELBO (after {train_cfg.kl_anneal_steps} KL-annealing steps)"
    return "ELBO"


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


# ------------------------------------------------------------------------------------------------
# checkpoints


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


#: The fields every checkpoint of ours holds.
CHECKPOINT_FIELDS = ("format", "step", "seconds", "model", "optimizer", "rng", "batch_rng",
                     "history", "evaluations", "model_config", "train_config")


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


# ------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    """What a finished (or resumed) run returns: the model and its loss trace."""

    model: RoutedLM
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    step: int = 0
    seconds: float = 0.0


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
        result = TrainResult(model)
        if resume:
            if checkpoint_path is None:
                raise ValueError("resume needs an output directory holding a checkpoint")
            payload = load_checkpoint(checkpoint_path)
            check_same_config(payload, model_cfg, train_cfg)
            saved_world = payload.get("world_size", 1)
            if saved_world != group.world_size:
                raise CheckpointError(
                    f"{checkpoint_path} was written by a run on {saved_world} process(es), "
                    f"this one has {group.world_size}: resume with the same number (the "
                    f"shards' random streams depend on it)")
            model.load_state_dict(payload["model"])
            optimiser.load_state_dict(payload["optimizer"])  # follows the parameters' device
            torch.set_rng_state(payload["rng"])
            if payload.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(payload["cuda_rng"])
            batch_rng.set_state(payload["batch_rng"])
            if scaler is not None and payload.get("scaler") is not None:
                scaler.load_state_dict(payload["scaler"])
            result.history = list(payload["history"])
            result.evaluations = list(payload["evaluations"])
            result.step = int(payload["step"])
            result.seconds = float(payload["seconds"])
            logger.info("resumed from %s at step %d", checkpoint_path, result.step)
        elif train_cfg.warm_start is not None:
            warm_start_lm(model, Path(train_cfg.warm_start))
        dataset_size = data.num_windows("train", train_cfg.seq_len)
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
                outcome = svi_step(objective, model, x, y, optimiser, dataset_size=dataset_size,
                                   grad_clip=train_cfg.grad_clip, auxiliary=auxiliary,
                                   micro_batches=train_cfg.micro_batches, seeds=seeds,
                                   distributed=group if group.active else None,
                                   scaler=scaler, kl_scale=kl_scale,
                                   gate_threshold=gate_threshold)
            except ValueError as error:
                # torch's argument validation of a distribution built from diverged parameters
                if not str(error).startswith("Expected parameter"):
                    raise
                bar.close()
                raise TrainingDiverged(step, math.nan, last_good, "distribution parameters",
                                       str(error).split("\n")[0]) from error
            if outcome.failed is not None:
                bar.close()
                value = outcome.loss if outcome.failed == "loss" else outcome.grad_norm
                raise TrainingDiverged(step, value, last_good, outcome.failed)
            overflows = overflows + 1 if outcome.overflow else 0
            if overflows >= MAX_OVERFLOWS:
                bar.close()
                raise TrainingDiverged(step, outcome.grad_norm, last_good, "gradient norm",
                                       f"{overflows} float16 overflows in a row (loss scale "
                                       f"now {scaler.get_scale():.3g}): the gradients are "
                                       f"not finite at any scale")
            if outcome.loss < IMPOSSIBLE_LOSS:
                bar.close()
                raise TrainingDiverged(step, outcome.loss, last_good, "loss",
                                       f"{outcome.loss:.4g} nats/token, impossible for a "
                                       "categorical likelihood (its NLL and KL are >= 0)")
            first = result.history[0]["loss"] if result.history else outcome.loss
            if outcome.loss > EXPLOSION_FACTOR * max(first, 1.0):
                bar.close()
                raise TrainingDiverged(step, outcome.loss, last_good, "loss",
                                       f"{outcome.loss:.4g} nats/token, over "
                                       f"{EXPLOSION_FACTOR:g} x the first step's "
                                       f"{first:.4g}: the run exploded")
            broken = _non_finite_state(model, optimiser)
            if broken is not None:
                bar.close()
                raise TrainingDiverged(step, math.nan, last_good, "parameters",
                                       f"{broken} is not finite after the update")
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
                        save_checkpoint(checkpoint_path, _checkpoint_payload(
                            model, optimiser, batch_rng, result, model_cfg, train_cfg,
                            group.world_size, scaler))
                    except Exception as error:  # e.g. a full disk: every rank stops
                        failed = error
                # also the barrier: no rank runs ahead of the checkpoint it would resume from
                group.agree(failed, f"the checkpoint of step {step}")
                last_good = checkpoint_path
        bar.close()
    return result


def _checkpoint_payload(model, optimiser, batch_rng, result: TrainResult,
                        model_cfg: TinyLMConfig, train_cfg: TrainConfig,
                        world_size: int = 1, scaler=None) -> dict:
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
    }


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


def load_trained(run_dir: Path, device: str | torch.device = "cpu",
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
