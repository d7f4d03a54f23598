"""The gradient-variance lab on the routed LM: many independent ELBO-gradient estimates at one
fixed point.

Holding the parameters and one minibatch fixed, each estimator of the registry draws ``M``
independent gradient estimates. They are summarised separately for three parameter groups of
:class:`~bayes_router.models.bayesian.BayesianRoutedLM`:

- ``phi``: the guide's parameters (the routing controllers),
- ``theta``: the model's parameters (the LM and its experts),
- ``beta0``: the prior concentration, as the unconstrained ``log beta0`` the optimiser sees.
  A model with a fixed ``beta0`` is copied into a lab model whose ``beta0`` is learned and
  initialised at the fixed value (the forward pass is unchanged), so its gradient is defined.

Per estimator and group the statistics of :mod:`bayes_router.variance.gradient_stats`
(variance, median SNR, seconds per estimate, efficiency, each relative to ``reparam-mc``).
Gradients are those of the per-token loss the training loop differentiates, ``-ELBO / (N T)``.

Sweeps here: over the number of particles (:func:`variance_vs_particles`) and over ``beta0``
with the guide held fixed (:func:`variance_vs_beta0`); each estimator's results are a list
aligned with the swept values. The study along training (it trains in segments) is
:func:`bayes_router.experiments.variance_lab.variance_along_training`; the conjugate toy, where
the exact gradient is known, is
:func:`bayes_router.variance.toy_variance.toy_gradient_variance`;
:func:`bayes_router.experiments.variance_lab.variance_lab` runs a whole study into a folder
(``variance.json``, figures, ``report.md``).

References

[1] `Tighter Variational Bounds are Not Necessarily Better`, Tom Rainforth, Adam R. Kosiorek,
    Tuan Anh Le, Chris J. Maddison, Maximilian Igl, Frank Wood, Yee Whye Teh (ICML 2018)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from bayes_router.inference.estimators import estimator_names, get_estimator
from bayes_router.inference.objective import AuxiliaryOptimiser, per_token_loss_and_surrogate
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.variance.gradient_stats import REFERENCE, add_relative, summarise_gradients

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PARTICLE_ESTIMATORS",
    "DEFAULT_SWEEP_ESTIMATORS",
    "GROUPS",
    "GROUP_LABELS",
    "aligned_points",
    "check_estimators",
    "gradient_variance",
    "lab_model",
    "parameter_groups",
    "variance_vs_beta0",
    "variance_vs_particles",
]

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


def aligned_points(points: Sequence, axis: Sequence, name: str) -> Sequence:
    """``points``, the entries of estimator ``name`` in a sweep, one per value of ``axis``:
    ``points[i]`` is the result (or ``{"skipped": reason}``) at ``axis[i]``.

    :raises ValueError: unless ``points`` is a sequence as long as ``axis`` (a dict keyed by
        the values' strings, the layout of sweeps before, is not)."""
    if isinstance(points, Mapping) or len(points) != len(axis):
        raise ValueError(f"the points of {name} must be a list aligned with the sweep's axis "
                         f"of {len(axis)} values, got {type(points).__name__} of "
                         f"{len(points)}")
    return points


def variance_vs_particles(model: BayesianRoutedLM, x: Tensor, y: Tensor, *,
                          particles: Sequence[int] = (1, 2, 4, 8),
                          estimators: Sequence[str] | None = DEFAULT_PARTICLE_ESTIMATORS,
                          num_draws: int = 30, **options) -> dict:
    """:func:`gradient_variance` at each number of particles; counts below an estimator's
    minimum (``iwae``, ``dreg`` with 1) are recorded as skipped.

    :returns: ``{"particles": [...], "estimators": {name: [result or {"skipped": reason}]},
        "num_draws"}``, each estimator's list aligned with ``particles``.
    """
    names = check_estimators(estimators)
    particles = sorted({int(n) for n in particles})
    if not particles or particles[0] < 1:
        raise ValueError(f"particles must be integers >= 1, got {particles}")
    table: dict[str, list] = {name: [] for name in names}
    for count in particles:
        usable = [n for n in names if get_estimator(n).min_particles <= count]
        result = (gradient_variance(model, x, y, estimators=usable, num_draws=num_draws,
                                    num_particles=count, **options) if usable else None)
        for name in names:
            table[name].append(result["estimators"][name] if name in usable else
                               {"skipped": f"{name} needs num_particles >= "
                                           f"{get_estimator(name).min_particles}"})
    return {"particles": particles, "estimators": table, "num_draws": num_draws}


def variance_vs_beta0(model: BayesianRoutedLM, x: Tensor, y: Tensor, *,
                      beta0_values: Sequence[float] = (0.1, 1.0, 10.0),
                      estimators: Sequence[str] | None = DEFAULT_SWEEP_ESTIMATORS,
                      num_draws: int = 30, **options) -> dict:
    """:func:`gradient_variance` with the prior concentration set to each value (the same in
    every layer) while the guide and the LM stay as trained.

    :returns: ``{"beta0_values": [...], "estimators": {name: [result]}, "num_draws"}``, each
        estimator's list aligned with ``beta0_values``.
    """
    names = check_estimators(estimators)
    values = sorted({float(v) for v in beta0_values})
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"beta0 values must be > 0, got {list(beta0_values)}")
    table: dict[str, list] = {name: [] for name in names}
    for value in values:
        result = gradient_variance(model, x, y, estimators=names, num_draws=num_draws,
                                   beta0=value, **options)
        for name in names:
            table[name].append(result["estimators"][name])
    return {"beta0_values": values, "estimators": table, "num_draws": num_draws}


