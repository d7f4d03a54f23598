"""The gradient-variance lab: many independent ELBO-gradient estimates at one fixed point.

Holding the parameters and one minibatch fixed, each estimator of the registry draws ``M``
independent gradient estimates. They are summarised separately for three parameter groups of
:class:`~bayes_router.models.bayesian.BayesianRoutedLM`:

- ``phi``: the guide's parameters (the routing controllers),
- ``theta``: the model's parameters (the LM and its experts),
- ``beta0``: the prior concentration, as the unconstrained ``log beta0`` the optimiser sees.
  A model with a fixed ``beta0`` is copied into a lab model whose ``beta0`` is learned and
  initialised at the fixed value (the forward pass is unchanged), so its gradient is defined.

Per estimator and group (:func:`summarise_gradients`): the norm of the mean gradient, the total
variance (trace of the covariance), the median over parameters of the signal-to-noise ratio
``|mean| / std`` [1], seconds per estimate, the efficiency ``1 / (variance x seconds)``, and each
of them relative to ``reparam-mc``. Gradients are those of the per-token loss the training loop
differentiates, ``-ELBO / (N T)``.

Sweeps: over the number of particles (:func:`variance_vs_particles`), over ``beta0`` with the
guide held fixed (:func:`variance_vs_beta0`), and along training (:func:`variance_along_training`,
which trains in segments and measures between them). On the conjugate toy, where the exact
gradient is known, :func:`toy_gradient_variance` adds each estimator's bias and z-scores.
:func:`bayes_router.experiments.variance_lab.variance_lab` runs a whole study into a folder
(``variance.json``, figures, ``report.md``).

References

[1] `Tighter Variational Bounds are Not Necessarily Better`, Tom Rainforth, Adam R. Kosiorek,
    Tuan Anh Le, Chris J. Maddison, Maximilian Igl, Frank Wood, Yee Whye Teh (ICML 2018)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch
from scipy.stats import chi2
from torch import Tensor
from tqdm.auto import tqdm

from bayes_router.data.tokens import TokenData
from bayes_router.inference.estimators import estimator_names, get_estimator
from bayes_router.inference.objective import AuxiliaryOptimiser, per_token_loss_and_surrogate
from bayes_router.inference.toy import gradient_draws, toy_elbo_grad
from bayes_router.inference.train import CHECKPOINT_NAME, build_routed_lm, train
from bayes_router.models.bayesian import BayesianRoutedLM

logger = logging.getLogger(__name__)

__all__ = [
    "GROUPS",
    "REFERENCE",
    "GradientSummary",
    "check_estimators",
    "gradient_variance",
    "lab_model",
    "parameter_groups",
    "summarise_gradients",
    "toy_gradient_variance",
    "variance_along_training",
    "variance_vs_beta0",
    "variance_vs_particles",
]

REFERENCE = "reparam-mc"
GROUPS = ("phi", "theta", "beta0")
GROUP_LABELS = {"phi": "guide phi (controllers)", "theta": "model theta (LM)",
                "beta0": "log beta0 (prior)"}
#: estimates discarded before timing, so that first-call overheads are not measured
TIMING_WARMUP = 2
DEFAULT_PARTICLE_ESTIMATORS = ("reparam-mc", "reparam-analytic", "stl", "score-baseline",
                               "iwae", "dreg")
DEFAULT_SWEEP_ESTIMATORS = ("reparam-mc", "reparam-analytic", "stl", "score-baseline")


# ------------------------------------------------------------------------------------------------
# summaries of gradient draws


@dataclass(frozen=True)
class GradientSummary:
    """Statistics of ``M`` gradient estimates of ``P`` parameters.

    :ivar int num_draws: ``M``.
    :ivar int num_parameters: ``P``.
    :ivar float mean_norm: Euclidean norm of the mean gradient.
    :ivar float total_variance: trace of the covariance, ``sum_p Var[g_p]`` (``ddof = 1``).
    :ivar float median_snr: median over parameters of ``|mean_p| / std_p``; a parameter whose
        draws are all equal and non-zero counts as ``inf``, one that is always zero is left out.
    :ivar int num_deterministic: parameters whose draws are all equal and non-zero.
    :ivar float seconds: seconds per estimate.
    :ivar float efficiency: ``1 / (total_variance * seconds)`` (``inf`` at zero variance).
    """

    num_draws: int
    num_parameters: int
    mean_norm: float
    total_variance: float
    median_snr: float
    num_deterministic: int
    seconds: float
    efficiency: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarise_gradients(draws, seconds: float = math.nan) -> GradientSummary:
    """Summarise gradient estimates ``draws`` of shape ``(M, P)`` (or ``(M,)`` for one parameter).

    :param seconds: seconds per estimate (``nan`` when unknown: the efficiency is then ``nan``).
    :raises ValueError: with fewer than two draws, or non-finite draws.
    """
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim == 1:
        draws = draws[:, None]
    if draws.ndim != 2:
        raise ValueError(f"draws must have shape (M, P), got {draws.shape}")
    if draws.shape[0] < 2:
        raise ValueError(f"need M >= 2 gradient draws to estimate a variance, got M = "
                         f"{draws.shape[0]}")
    if not np.isfinite(draws).all():
        raise ValueError("draws contain NaN or Inf")
    mean = draws.mean(0)
    variance = draws.var(0, ddof=1)
    std = np.sqrt(variance)
    stochastic = std > 0
    snr = np.full(mean.shape, np.inf)
    snr[stochastic] = np.abs(mean[stochastic]) / std[stochastic]
    active = stochastic | (mean != 0)
    median_snr = float(np.median(snr[active])) if active.any() else math.nan
    total_variance = float(variance.sum())
    if not (math.isfinite(seconds) and seconds > 0):
        efficiency = math.nan
    elif total_variance > 0:
        efficiency = 1.0 / (total_variance * seconds)
    else:
        efficiency = math.inf
    return GradientSummary(
        num_draws=int(draws.shape[0]), num_parameters=int(draws.shape[1]),
        mean_norm=float(np.linalg.norm(mean)), total_variance=total_variance,
        median_snr=median_snr, num_deterministic=int((~stochastic & (mean != 0)).sum()),
        seconds=float(seconds), efficiency=efficiency)


def snr_noise_floor(num_draws: int) -> float:
    """The median of ``|mean| / std`` over parameters whose true gradient is zero, for Gaussian
    draws: ``|t| / sqrt(M)`` has median ``0.674 / sqrt(M)`` (0.067 at ``M = 100``). A median SNR
    near it says the estimator does not resolve the gradient with ``M`` draws."""
    return 0.6745 / math.sqrt(num_draws)


def _ratio(value: float, reference: float) -> float:
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return math.nan
    return value / reference


def add_relative(results: dict, reference: str = REFERENCE) -> None:
    """Add ``relative[group]`` (variance, SNR, seconds and efficiency ratios to ``reference``) to
    every estimator of ``results`` (``name -> {"groups": {group: summary dict}}``), in place."""
    if reference not in results:
        return
    ref = results[reference]["groups"]
    for entry in results.values():
        entry["relative"] = {
            group: {f"{key}_ratio": _ratio(summary[key], ref[group][key])
                    for key in ("total_variance", "median_snr", "seconds", "efficiency")}
            for group, summary in entry["groups"].items() if group in ref
        }


# ------------------------------------------------------------------------------------------------
# the lab model and its parameter groups


def check_estimators(names: Sequence[str] | None) -> list[str]:
    """Validated estimator names (all registered ones for ``None``).

    :raises ValueError: for an empty list or an unknown name (listing the valid ones).
    """
    if names is None:
        return list(estimator_names())
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"estimators is empty; valid names: {', '.join(estimator_names())}")
    for name in names:
        get_estimator(name)  # raises ValueError listing the valid names
    return list(dict.fromkeys(names))


def check_num_draws(num_draws: int) -> int:
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 2:
        raise ValueError(f"num_draws (M) must be an integer >= 2 to estimate a variance, got "
                         f"{num_draws!r}")
    return num_draws


def particles_for(name: str, num_particles: int | None) -> int:
    estimator = get_estimator(name)
    particles = max(1, estimator.min_particles) if num_particles is None else num_particles
    return estimator.check_num_particles(particles)  # clear error, e.g. dreg with 1 particle


def lab_model(model: BayesianRoutedLM, estimator=None, beta0: float | Sequence[float] | None = None
              ) -> BayesianRoutedLM:
    """A copy of ``model`` whose ``beta0`` is a learned parameter, so that it has a gradient.

    :param estimator: the estimator (or its name) whose Dirichlet family the copy's guide
        uses; default the model's.
    :param beta0: the copy's ``beta0`` (a scalar or one per layer); default the model's.
    """
    if not isinstance(model, BayesianRoutedLM):
        raise TypeError("the gradient-variance lab needs a BayesianRoutedLM: the prior-free "
                        f"router has no routing latents (got {type(model).__name__})")
    estimator = None if estimator is None else get_estimator(estimator)
    with pyro.settings.context(module_local_params=True):
        return model.with_learned_beta0(beta0, estimator)


def parameter_groups(model: BayesianRoutedLM) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """``phi`` (controllers), ``theta`` (everything else) and ``beta0`` (if learned)."""
    groups: dict[str, list] = {group: [] for group in GROUPS}
    for name, param in model.named_parameters():
        if name == "beta0_unconstrained":
            groups["beta0"].append((name, param))
        elif name.startswith("controllers."):
            groups["phi"].append((name, param))
        else:
            groups["theta"].append((name, param))
    return {group: params for group, params in groups.items() if params}


# ------------------------------------------------------------------------------------------------
# drawing gradients of the routed LM


def _draw_lm_gradients(lab: BayesianRoutedLM, estimator, elbo, x: Tensor, y: Tensor,
                       dataset_size: int, num_draws: int, warmup: int, baseline_lr: float,
                       bar=None) -> tuple[dict[str, np.ndarray], list[float]]:
    groups = parameter_groups(lab)
    draws = {group: np.empty((num_draws, sum(p.numel() for _, p in params)), dtype=np.float32)
             for group, params in groups.items()}
    seconds = []
    auxiliary = AuxiliaryOptimiser(estimator, elbo, lr=baseline_lr)
    for i in range(warmup + num_draws):
        lab.zero_grad(set_to_none=True)
        start = time.perf_counter()
        _, surrogate = per_token_loss_and_surrogate(elbo, lab, x, y, dataset_size=dataset_size)
        surrogate.backward()
        elapsed = time.perf_counter() - start
        auxiliary.step()
        if i < warmup:
            continue
        seconds.append(elapsed)
        for group, params in groups.items():
            draws[group][i - warmup] = torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for _, p in params]).detach().numpy()
        if bar is not None:
            bar.update(1)
    lab.zero_grad(set_to_none=True)
    return draws, seconds


def gradient_variance(model: BayesianRoutedLM, x: Tensor, y: Tensor, *,
                      dataset_size: int | None = None, estimators: Sequence[str] | None = None,
                      num_draws: int = 50, num_particles: int | None = None,
                      warmup: int | None = None, beta0: float | Sequence[float] | None = None,
                      baseline_lr: float = 0.01, seed: int = 0, progress: bool = False) -> dict:
    """``M`` gradient estimates per estimator at ``model``'s parameters on the minibatch ``(x, y)``.

    :param model: a Bayesian routed LM; it is not modified (the lab works on a copy, see
        :func:`lab_model`).
    :param dataset_size: size of the ``batch`` plate (default the batch size).
    :param estimators: registry names (default all); ``reparam-mc``, the reference of the
        ratios, is added when missing.
    :param num_draws: ``M >= 2`` estimates per estimator.
    :param num_particles: vectorised particles per estimate (default each estimator's fewest:
        1, or 2 for ``iwae`` and ``dreg``).
    :param warmup: discarded estimates made first, so that baselines settle and timings exclude
        first-call overheads (default the estimator's ``warmup_steps``, at least
        :data:`TIMING_WARMUP`).
    :param beta0: evaluate at this prior concentration instead of the model's.
    :param baseline_lr: Adam learning rate of learned baselines (updated after every estimate).
    :param seed: seeds every estimator's draws (the same seed for each).
    :returns: ``{"estimators": {name: {"num_particles", "unbiased", "groups": {group: summary},
        "relative": {group: ratios}}}, "reference", "num_draws", "batch_shape",
        "dataset_size", "beta0"}``.
    :raises ValueError: for ``M < 2``, an unknown estimator, or too few particles for one.
    """
    names = check_estimators(estimators)
    if REFERENCE not in names:
        names = [REFERENCE] + names
    num_draws = check_num_draws(num_draws)
    particles = {name: particles_for(name, num_particles) for name in names}
    dataset_size = x.shape[0] if dataset_size is None else int(dataset_size)
    results = {}
    bar = tqdm(total=num_draws * len(names), disable=not progress, desc="gradient draws",
               dynamic_ncols=True)
    store = pyro.get_param_store()
    with pyro.settings.context(module_local_params=True), store.scope(), \
            torch.random.fork_rng(devices=[]):
        for name in names:
            estimator = get_estimator(name)
            lab = lab_model(model, estimator, beta0=beta0)
            elbo = estimator.make_elbo(num_particles=particles[name], vectorize_particles=True,
                                       max_plate_nesting=1)
            skip = warmup if warmup is not None else max(TIMING_WARMUP, estimator.warmup_steps)
            torch.manual_seed(seed)
            bar.set_postfix(estimator=name)
            draws, seconds = _draw_lm_gradients(lab, estimator, elbo, x, y, dataset_size,
                                                num_draws, skip, baseline_lr, bar)
            per_estimate = float(np.median(seconds))
            results[name] = {
                "num_particles": particles[name], "unbiased": estimator.unbiased,
                "warmup": skip,
                "groups": {group: summarise_gradients(values, per_estimate).to_dict()
                           for group, values in draws.items()},
            }
            logger.info("%s: %s", name, {g: f"{s['total_variance']:.3g}"
                                         for g, s in results[name]["groups"].items()})
    bar.close()
    add_relative(results)
    return {"estimators": results, "reference": REFERENCE, "num_draws": num_draws,
            "batch_shape": list(x.shape), "dataset_size": dataset_size,
            "beta0": model.current_beta0().detach().clone().tolist() if beta0 is None else beta0}


def variance_vs_particles(model: BayesianRoutedLM, x: Tensor, y: Tensor, *,
                          particles: Sequence[int] = (1, 2, 4, 8),
                          estimators: Sequence[str] | None = DEFAULT_PARTICLE_ESTIMATORS,
                          num_draws: int = 30, **options) -> dict:
    """:func:`gradient_variance` at each number of particles; counts below an estimator's
    minimum (``iwae``, ``dreg`` with 1) are recorded as skipped.

    :returns: ``{"particles": [...], "estimators": {name: {str(N): result or {"skipped"}}}}``.
    """
    names = check_estimators(estimators)
    particles = sorted({int(n) for n in particles})
    if not particles or particles[0] < 1:
        raise ValueError(f"particles must be integers >= 1, got {particles}")
    table: dict[str, dict] = {name: {} for name in names}
    for count in particles:
        usable = [n for n in names if get_estimator(n).min_particles <= count]
        for name in set(names) - set(usable):
            table[name][str(count)] = {"skipped": f"{name} needs num_particles >= "
                                                  f"{get_estimator(name).min_particles}"}
        if not usable:
            continue
        result = gradient_variance(model, x, y, estimators=usable, num_draws=num_draws,
                                   num_particles=count, **options)
        for name in usable:
            table[name][str(count)] = result["estimators"][name]
    return {"particles": particles, "estimators": table, "num_draws": num_draws}


def variance_vs_beta0(model: BayesianRoutedLM, x: Tensor, y: Tensor, *,
                      beta0_values: Sequence[float] = (0.1, 1.0, 10.0),
                      estimators: Sequence[str] | None = DEFAULT_SWEEP_ESTIMATORS,
                      num_draws: int = 30, **options) -> dict:
    """:func:`gradient_variance` with the prior concentration set to each value (the same in
    every layer) while the guide and the LM stay as trained.

    :returns: ``{"beta0_values": [...], "estimators": {name: {str(beta0): result}}}``.
    """
    names = check_estimators(estimators)
    values = sorted({float(v) for v in beta0_values})
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"beta0 values must be > 0, got {list(beta0_values)}")
    table: dict[str, dict] = {name: {} for name in names}
    for value in values:
        result = gradient_variance(model, x, y, estimators=names, num_draws=num_draws,
                                   beta0=value, **options)
        for name in names:
            table[name][repr(value)] = result["estimators"][name]
    return {"beta0_values": values, "estimators": table, "num_draws": num_draws}


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

    :returns: ``{"steps": [...], "estimators": {name: {str(step): result}}, "loss": {...}}``.
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
    table: dict[str, dict] = {name: {} for name in names}
    losses = {}
    for step, model, loss in models_along_training(model_cfg, train_cfg, data, out_dir, steps,
                                                    progress):
        if loss is not None:
            losses[str(step)] = loss
        measured = gradient_variance(model, x, y, dataset_size=dataset_size, estimators=names,
                                     num_draws=num_draws, **options)
        for name in names:
            table[name][str(step)] = measured["estimators"][name]
    return {"steps": steps, "estimators": table, "train_loss": losses,
            "num_draws": num_draws, "run_dir": str(out_dir)}


# ------------------------------------------------------------------------------------------------
# the conjugate toy


TOY_COUNTS = (6.0, 3.0, 1.0)
TOY_PRIOR = (0.5, 1.0, 1.5)
TOY_POINT = (2.0, 3.0, 1.5)


def toy_gradient_variance(estimators: Sequence[str] | None = None, *, num_draws: int = 20000,
                          a=TOY_POINT, counts=TOY_COUNTS, prior=TOY_PRIOR,
                          num_particles: int | None = None, batch_size: int = 2000,
                          seed: int = 0) -> dict:
    """Each estimator's draws on the conjugate toy against the exact ELBO gradient.

    Per estimator: the summary of :func:`summarise_gradients`, the mean and exact gradients,
    the bias ``mean - exact``, its z-scores ``bias / (std / sqrt(M))``, and Hotelling's
    statistic ``M d^T S^-1 d`` with its chi-square p-value (small for a biased estimator, or by
    chance once in a thousand at ``p < 0.001``). Seconds per estimate are amortised over
    vectorised replicas (``batch_size`` estimates per pass).
    """
    names = check_estimators(estimators)
    if REFERENCE not in names:
        names = [REFERENCE] + names
    num_draws = check_num_draws(num_draws)
    a = torch.as_tensor(a, dtype=torch.float64)
    counts = torch.as_tensor(counts, dtype=torch.float64)
    prior = torch.as_tensor(prior, dtype=torch.float64)
    exact = toy_elbo_grad(a, counts, prior).numpy()
    results = {}
    for name in names:
        estimator = get_estimator(name)
        particles = particles_for(name, num_particles)
        warmup = estimator.warmup_steps
        gradient_draws(estimator, a, 2, counts, prior, num_particles=particles, seed=seed)
        start = time.perf_counter()
        draws = gradient_draws(estimator, a, num_draws, counts, prior, num_particles=particles,
                               batch_size=batch_size, warmup=warmup, seed=seed).numpy()
        seconds = (time.perf_counter() - start) / (num_draws + warmup * min(batch_size,
                                                                            num_draws))
        summary = summarise_gradients(draws, seconds)
        mean = draws.mean(0)
        covariance = np.cov(draws.T)
        standard_error = draws.std(0, ddof=1) / math.sqrt(num_draws)
        bias = mean - exact
        hotelling = float(num_draws * bias @ np.linalg.solve(covariance, bias))
        results[name] = {
            "num_particles": particles, "unbiased": estimator.unbiased,
            "groups": {"a": summary.to_dict()},
            "mean": mean.tolist(), "exact": exact.tolist(), "bias": bias.tolist(),
            "standard_error": standard_error.tolist(),
            "z": (bias / standard_error).tolist(),
            "max_abs_z": float(np.max(np.abs(bias / standard_error))),
            "hotelling": hotelling,
            "p_value": float(chi2.sf(hotelling, df=len(exact))),
        }
    add_relative(results)
    return {"estimators": results, "reference": REFERENCE, "num_draws": num_draws,
            "a": a.tolist(), "counts": counts.tolist(), "prior": prior.tolist(),
            "exact_gradient": exact.tolist()}
