"""Empirical Bayes for the prior concentration ``beta0``: both methods on a trained model.

Two methods, meant to cross-check each other (``docs/empirical-bayes.md``):

1. **Minka's M-step** (:func:`fit_beta0_minka`): the guide's expected sufficient statistics
   (:func:`guide_concentrations`) fitted by :mod:`bayes_router.inference.minka`.
2. **Type-II maximum likelihood inside SVI** (:func:`fit_beta0_svi`): ``beta0`` as a positive
   ``pyro.param`` of the model (``BayesianRoutedLM(beta0="learn")``), continued from a trained
   run. The section below explains why the two share their fixed point. The run-level study
   (both methods on a run directory, scored by the held-out ELBO) is
   :func:`bayes_router.experiments.beta0_fit.fit_beta0_run`.

References

[1] `Estimating a Dirichlet distribution`, Thomas P. Minka (technical report, 2000; revised
    2012)
"""

from __future__ import annotations

import logging

import pyro
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from bayes_router.core.dirichlet import expected_log_alpha
from bayes_router.core.optim import adamw
from bayes_router.data.tokens import TokenData
from bayes_router.inference.estimators import get_estimator
from bayes_router.inference.minka import fit_dirichlet, fit_precision
from bayes_router.inference.objective import StepOptions, svi_step
from bayes_router.models.bayesian import BayesianRoutedLM
from bayes_router.models.priors import compute_aware_prior

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "SETTLED_LOG_DRIFT", "fit_beta0_minka", "fit_beta0_svi",
           "guide_concentrations", "prior_mean"]


# ------------------------------------------------------------------------------------------
# Type-II maximum likelihood inside SVI (variational EM over beta0), and both methods on a run.
#
# With ``beta0`` a positive parameter of the model, the ELBO depends on it through the prior
# term only: ``-sum_{l,b,t} KL(q(alpha_l[b,t]) || Dir(beta0_l pi))``, whose ``beta0``-dependent
# part is ``sum_{b,t} E_q[log Dir(alpha_l[b,t] | beta0_l pi)]``. Its stationary point in
# ``beta0_l`` with the guide held fixed is therefore exactly Minka's M-step on the guide's
# expected statistics: SVI on ``beta0`` alone converges to :func:`fit_precision`'s answer,
# and joint SVI (guide and ``beta0`` together) is variational EM.
# ------------------------------------------------------------------------------------------

METHODS = ("svi", "minka", "both")
SETTLED_LOG_DRIFT = 0.05  # SVI's beta0 counts as settled if log beta0 moved less over its tail


def prior_mean(model: BayesianRoutedLM) -> Tensor:
    """The model's prior mean ``pi`` in float64."""
    return compute_aware_prior(model.costs, 1.0, model.eta).to(torch.float64)


@torch.no_grad()
def guide_concentrations(model, batches, seed: int = 0) -> tuple[list[Tensor], float, int]:
    """Run the guide on ``batches`` and collect every token's concentration per layer.

    Layer ``l``'s concentration depends on the samples of the layers below it (the guide is
    autoregressive over layers), so each batch draws one sample path, seeded with
    ``seed + j`` for batch ``j`` (the same draws as a loss evaluated under that seed).

    :param batches: ``(x, y)`` token batches.
    :returns: per layer an ``(N, K)`` float64 tensor of concentrations, the total
        log-likelihood ``sum log p(y | x, alpha)`` of those samples (0 when ``y`` is None),
        and the number of tokens ``N``.
    """
    concentrations, log_likelihood, tokens = None, 0.0, 0
    with pyro.settings.context(module_local_params=True), torch.random.fork_rng(devices=[]):
        for j, (x, y) in enumerate(batches):
            torch.manual_seed(seed + j)
            out = model.guide(x)
            model.clear_cache()
            layers = [r.decision.concentration.reshape(-1, r.decision.concentration.shape[-1])
                      .to(torch.float64) for r in out.routing]
            concentrations = ([[c] for c in layers] if concentrations is None
                              else [acc + [c] for acc, c in zip(concentrations, layers,
                                                                strict=True)])
            if y is not None:
                log_likelihood -= float(F.cross_entropy(
                    out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1),
                    reduction="sum"))
            tokens += x.numel()
    if concentrations is None:
        raise ValueError("batches is empty")
    return [torch.cat(c) for c in concentrations], log_likelihood, tokens


def fit_beta0_minka(concentrations: list[Tensor], pi: Tensor, update_pi: bool = False) -> dict:
    """Minka's M-step per layer on the guide's expected statistics.

    :param concentrations: per layer, the guide's ``(N, K)`` concentrations
        (:func:`guide_concentrations`).
    :param pi: ``(K,)`` prior mean (the run's cost-based ``pi``), held fixed by
        :func:`fit_precision`.
    :param update_pi: also fit mean and precision together (:func:`fit_dirichlet`).
    :returns: ``{"beta0": [per layer], "converged", "message", "statistics", and with
        update_pi "full_precision", "full_mean", "full_converged", "full_message"}``: every fit
        reports whether it converged, and why not.
    """
    pi = torch.as_tensor(pi, dtype=torch.float64)
    result: dict = {"beta0": [], "converged": [], "message": [], "statistics": []}
    if update_pi:
        result.update(full_precision=[], full_mean=[], full_converged=[], full_message=[])
    for concentration in concentrations:
        stats = expected_log_alpha(concentration).mean(0)
        fit = fit_precision(stats, pi)
        result["beta0"].append(fit.precision)
        result["converged"].append(fit.converged)
        result["message"].append(fit.message)
        result["statistics"].append(stats.tolist())
        if update_pi:
            full = fit_dirichlet(stats)
            result["full_precision"].append(full.precision)
            result["full_mean"].append(full.mean.tolist())
            result["full_converged"].append(full.converged)
            result["full_message"].append(full.message)
    return result


def fit_beta0_svi(model: BayesianRoutedLM, data: TokenData, train_cfg, steps: int, *,
                  beta0_lr: float = 0.05,
                  lr: float | None = None, freeze_guide: bool = False, learn_beta0: bool = True,
                  batches=None, average_last: float = 0.25, seed: int = 0,
                  progress: bool = False) -> dict:
    """Type-II maximum likelihood inside SVI, continuing from ``model``'s parameters.

    A copy of ``model`` with ``beta0`` a learned parameter (initialised at the model's
    ``beta0``) is trained for ``steps`` SVI steps with the run's estimator and particle count
    on the full ELBO (no KL annealing, and no ``kl_weight``: type-II maximum likelihood needs
    the ELBO itself). ``beta0`` gets its own, larger learning rate
    ``beta0_lr`` (the per-token gradient of ``log beta0`` is small, and Adam at the LM's rate
    would need thousands of steps); gradient clipping applies to the other parameters only.

    :param freeze_guide: optimise ``beta0`` alone (the M-step by gradient ascent) instead of
        jointly with the guide and the LM (variational EM).
    :param learn_beta0: ``False`` keeps ``beta0`` at the model's value and trains the rest the
        same way: the control that separates the effect of learning ``beta0`` from that of the
        extra training steps.
    :param batches: a fixed list of ``(x, y)`` batches, cycled, each evaluated under seed
        ``seed + j``: with ``freeze_guide`` the objective is then a deterministic function of
        ``beta0`` and the fit converges to Minka's answer on :func:`guide_concentrations` of the
        same batches and seed. Default: random training batches.
    :param average_last: the estimate is the geometric mean of ``beta0`` over this final
        fraction of the steps (Polyak averaging of the noisy iterates).
    :returns: ``{"beta0": [per layer], "trace": [[per layer] per step], "last": the final
        iterate, "tail_log_drift": the largest change of ``log beta0`` over the averaged tail
        (large: still drifting, not converged), "model": the copy}``.
    """
    if steps < 1 or not 0 < average_last <= 1 or not beta0_lr > 0:
        raise ValueError(f"need steps >= 1, 0 < average_last <= 1 and beta0_lr > 0; got "
                         f"{steps}, {average_last}, {beta0_lr}")
    if freeze_guide and not learn_beta0:
        raise ValueError("freeze_guide with learn_beta0=False leaves nothing to train")
    generator = torch.Generator().manual_seed(seed)
    trace = []
    with pyro.settings.context(module_local_params=True), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        estimator = get_estimator(train_cfg.estimator)  # the run's estimator and its family
        lab = model.with_learned_beta0(estimator=estimator)
        beta0 = dict(lab.named_parameters())["beta0_unconstrained"]
        others = [p for name, p in lab.named_parameters() if name != "beta0_unconstrained"]
        groups = []
        if learn_beta0:
            groups.append({"params": [beta0], "lr": beta0_lr, "weight_decay": 0.0})
        else:
            beta0.requires_grad_(False)
        if freeze_guide:
            for p in others:
                p.requires_grad_(False)
        else:
            groups.append({"params": others, "lr": train_cfg.lr if lr is None else lr,
                           "weight_decay": train_cfg.weight_decay})
        optimiser = adamw(groups)
        elbo = estimator.make_elbo(num_particles=train_cfg.num_particles,
                                   vectorize_particles=True, max_plate_nesting=1)
        options = StepOptions(dataset_size=data.num_windows("train", train_cfg.seq_len),
                              grad_clip=None if freeze_guide else train_cfg.grad_clip,
                              clip_parameters=[beta0] if freeze_guide else others)
        for step in tqdm(range(steps), disable=not progress, desc="svi beta0",
                         dynamic_ncols=True):
            if batches is not None:
                j = step % len(batches)
                x, y = batches[j]
                torch.manual_seed(seed + j)
            else:
                x, y = data.sample_batch("train", train_cfg.batch_size, train_cfg.seq_len,
                                         generator)
            lab.train()
            outcome = svi_step(elbo, lab, x, y, optimiser, options)
            if outcome.failed is not None:
                raise FloatingPointError(f"the {outcome.failed} is not finite at SVI step "
                                         f"{step + 1}")
            if learn_beta0 and not bool(torch.isfinite(beta0.detach()).all()):
                raise FloatingPointError(f"beta0 is not finite after SVI step {step + 1}")
            trace.append(lab.beta0.detach().tolist())
        lab.eval()
    tail = torch.tensor(trace[-max(1, int(round(average_last * steps))):], dtype=torch.float64)
    estimate = tail.log().mean(0).exp()
    drift = (tail[-1].log() - tail[0].log()).abs().max()
    return {"beta0": estimate.tolist(), "trace": trace, "model": lab,
            "last": trace[-1], "tail_log_drift": float(drift),
            "freeze_guide": freeze_guide, "learn_beta0": learn_beta0, "beta0_lr": beta0_lr,
            "steps": steps}
