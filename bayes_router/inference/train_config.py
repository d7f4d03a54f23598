"""The training configuration: :class:`TrainConfig`, its validation and schedules, and what a
configuration makes of the objective (:func:`objective_label`, :func:`gated_training_bias`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from bayes_router.core.options import option
from bayes_router.core.precision import DTYPES, resolve_dtype
from bayes_router.core.validation import check_int, check_positive
from bayes_router.inference.estimators import estimator_names, get_estimator
from bayes_router.models.priors import PRIOR_MEANS, PRIORS, check_prior_options
from bayes_router.models.static import STATIC_KINDS

ROUTERS = ("bayesian", "prior-free")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run besides the LM configuration.

    :param router: ``"bayesian"``, ``"prior-free"``, or a static baseline ``"fixed:<expert>"``,
        ``"fixed:<shares>"``, ``"soft:<shares>"`` (:mod:`bayes_router.models.static`).
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

    router: str = option(
        "bayesian", f"{' or '.join(ROUTERS)}, or a static baseline: fixed:<expert> (one expert "
        "everywhere), fixed:<s1,..,sK> (constant hard shares in the order of --experts, "
        "positions assigned at random with the seed), soft:<s1,..,sK> (a constant soft mix)")
    prior: str = option(
        "power", "power: beta0 * pi with pi ~ c^-eta, guide softplus + a_min; seed: the public "
        "prototype's eps + beta0 (1 - c), guide beta + softplus", choices=PRIORS)
    prior_mean: str = option(
        "fixed", "learn: a per-layer prior mean fitted by type-II ML (empirical Bayes)",
        choices=PRIOR_MEANS)
    estimator: str = option(
        "reparam-analytic", "ELBO gradient estimator (see `bayes-router variance`)",
        flag="--elbo", aliases=("--estimator",), choices=estimator_names(), metavar="NAME")
    num_particles: int = option(1, "vectorised particles per step")
    beta0: float | tuple[float, ...] | str = option(
        1.0, "prior concentration: a number, one per layer (a,b), or 'learn'")
    beta0_init: float = option(1.0, "initial beta0 with --beta0 learn")
    eta: float = option(1.0, "cost sensitivity of the prior mean pi ~ c^-eta")
    a_min: float = option(0.05, "floor of the guide's concentrations (power prior)")
    tau: float = option(1.0, "prior-free softmax temperature")
    steps: int = option(300, "SVI steps")
    batch_size: int = option(
        16, "sequences per step: the global batch, shared out over torchrun's processes")
    seq_len: int = option(128, "tokens per sequence")
    lr: float = option(3e-3, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient-norm clipping threshold")
    kl_anneal_steps: int = option(
        0, "steps over which the KL weight rises to 1 (0: no annealing)")
    kl_anneal_start: float = option(
        0.0, "the KL weight at step 0 of the annealing, in [0, 1]")
    kl_weight: float = option(
        1.0, "constant factor on the KL term (1: the ELBO; else a beta-VAE ablation)")
    free_bits: float = option(
        0.0, "lambda >= 0: each token's KL per layer counts as max(KL, lambda); NOT an ELBO "
        "for lambda > 0 (needs --elbo reparam-analytic)")
    warm_start: str | None = option(
        None, "initialise the LM from a trained run (prior-free or fixed), then fit",
        metavar="RUN_DIR")
    gate_final: float = option(
        0.0, "final soft-to-hard gate threshold (normalised entropy); 0: off")
    gate_start: float = option(
        0.5, "fraction of training at which the gate threshold starts rising from 0")
    gate_end: float = option(
        0.9, "fraction of training at which the gate threshold reaches --gate-final")
    eval_every: int = option(100, "validate every N steps")
    eval_batches: int | None = option(
        8, "validation batches of 16 windows per periodic evaluation",
        none_flag="--eval-all",
        none_help="evaluate on the whole validation split (periodic and final)")
    log_every: int = option(
        10, "log the objective's parts (NLL, KL per layer and its ELBO-surgery split, spread, "
        "a0) every N steps")
    micro_batches: int = option(
        1, "shards of each process's batch whose gradients are averaged (gradient "
        "accumulation)")
    dtype: str = option(
        "float32", "the LM's matmuls under autocast (float16 with loss scaling); the router "
        "and the Dirichlet maths stay in full precision", choices=tuple(DTYPES))
    checkpoint_every: int = option(100, "checkpoint every N steps")
    seed: int = option(0, "random seed")
    dataset: str = option(
        "stdlib", "'stdlib', a text file or folder, or synthetic:<task or preset>",
        flag="--corpus")
    dataset_max_chars: int | None = option(
        1_000_000, "characters of the corpus used", flag="--max-chars")

    def __post_init__(self):
        if isinstance(self.beta0, list):
            object.__setattr__(self, "beta0", tuple(self.beta0))
        if self.router not in ROUTERS and self.router.partition(":")[0] not in STATIC_KINDS:
            raise ValueError(f"router must be one of {ROUTERS} or a static baseline "
                             f"'fixed:<expert>', 'fixed:<shares>', 'soft:<shares>'; got "
                             f"{self.router!r}")
        # the prior's options: the rules the model applies too, in one place
        check_prior_options(beta0=self.beta0, eta=self.eta, a_min=self.a_min,
                            beta0_init=self.beta0_init, prior=self.prior,
                            prior_mean=self.prior_mean)
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
            check_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed < 2 ** 63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not (isinstance(self.weight_decay, int | float) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got "
                             f"{self.weight_decay!r}")
        for name in ("tau", "lr", "grad_clip", "kl_weight"):
            check_positive(name, getattr(self, name))
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
    keeps the objective an ELBO) and says so: :func:`~bayes_router.inference.train.train`
    logs this message and run directories record it as ``gradient_bias``.
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
