"""One differentiable objective for every ELBO, and the one SVI step built on it.

:func:`loss_and_surrogate` returns ``(loss value, surrogate to differentiate)`` for any ELBO;
:func:`per_token_loss_and_surrogate` scales them per token; :func:`svi_step` is the step that
training, empirical Bayes and the step timing share; :class:`AuxiliaryOptimiser` trains the
parameters an estimator's ELBO owns.

Pyro's ELBOs expose their surrogate differently: ``Trace_ELBO`` and its subclasses through
``_differentiable_loss_particle``, ``TraceGraph_ELBO`` through ``_loss_and_surrogate_loss``.
Training and the gradient-variance lab need both numbers from one set of traces (the reported
loss must be the ELBO estimate, not the surrogate, whose value differs for score-function
estimators), and they drive the optimiser themselves, so this module asks each ELBO for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceGraph_ELBO
from torch import Tensor


def loss_and_surrogate(elbo: ELBO, model, guide, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """Negative-ELBO estimate (detached) and the surrogate loss whose gradient is the estimator.

    :raises TypeError: for an ELBO that exposes no differentiable surrogate.
    """
    own = getattr(elbo, "loss_and_surrogate", None)
    if callable(own):
        loss, surrogate = own(model, guide, *args, **kwargs)
        return torch.as_tensor(loss).detach(), surrogate
    if isinstance(elbo, TraceGraph_ELBO):
        elbo_value, surrogate = elbo._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -torch.as_tensor(elbo_value).detach(), surrogate
    if isinstance(elbo, Trace_ELBO):
        loss, surrogate = 0.0, 0.0
        for model_trace, guide_trace in elbo._get_traces(model, guide, args, kwargs):
            particle_loss, particle_surrogate = elbo._differentiable_loss_particle(
                model_trace, guide_trace)
            loss = loss + particle_loss / elbo.num_particles
            surrogate = surrogate + particle_surrogate / elbo.num_particles
        return torch.as_tensor(loss).detach(), torch.as_tensor(surrogate)
    raise TypeError(f"{type(elbo).__name__} exposes no differentiable surrogate; give it a "
                    "loss_and_surrogate(model, guide, *args, **kwargs) method")


def per_token_loss_and_surrogate(elbo: ELBO, model, x: Tensor, y: Tensor, *,
                                 dataset_size: int, **model_kwargs) -> tuple[Tensor, Tensor]:
    """:func:`loss_and_surrogate` of ``model.model`` / ``model.guide`` on ``(x, y)``, per token.

    The ``batch`` plate scales the minibatch to ``dataset_size`` sequences, so the loss is a sum
    over ``dataset_size * T`` tokens; dividing by that keeps learning rates independent of the
    dataset size. ``model_kwargs`` (``kl_scale``, ``gate_threshold``) go to model and guide.
    """
    loss, surrogate = loss_and_surrogate(elbo, model.model, model.guide, x, y,
                                         dataset_size=dataset_size, **model_kwargs)
    tokens = dataset_size * x.shape[1]
    return loss / tokens, surrogate / tokens


class AuxiliaryOptimiser:
    """Adam over the parameters an estimator's ELBO owns (:meth:`Estimator.auxiliary_parameters`,
    e.g. learned baselines). They appear lazily, on first sight of a site, and join on the next
    :meth:`step`. Their state is not checkpointed: a resumed run starts them afresh, which
    changes the variance, not the expectation, of the gradient.

    :param estimator: the estimator that built ``elbo``.
    :param lr: Adam's learning rate.
    """

    def __init__(self, estimator, elbo: ELBO, lr: float):
        self.estimator, self.elbo, self.lr = estimator, elbo, float(lr)
        self.optimiser: torch.optim.Optimizer | None = None

    def step(self) -> None:
        """One Adam step on every auxiliary parameter that has a gradient; clears the grads."""
        params = [p for p in self.estimator.auxiliary_parameters(self.elbo) if p.grad is not None]
        if not params:
            return
        if self.optimiser is None:
            self.optimiser = torch.optim.Adam(params, lr=self.lr)
        else:
            known = {id(p) for group in self.optimiser.param_groups for p in group["params"]}
            new = [p for p in params if id(p) not in known]
            if new:
                self.optimiser.add_param_group({"params": new})
        self.optimiser.step()
        self.optimiser.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        """Drop the auxiliary parameters' gradients without a step (a skipped SVI step)."""
        for p in self.estimator.auxiliary_parameters(self.elbo):
            p.grad = None


@dataclass(frozen=True)
class StepResult:
    """What one SVI step did.

    :ivar loss: the negative-ELBO estimate per token (before the step).
    :ivar grad_norm: the gradient norm before clipping (NaN when the loss already failed).
    :ivar failed: ``None``, or which quantity was not finite (``"loss"`` or ``"gradient
        norm"``); the parameters were then left unchanged.
    """

    loss: float
    grad_norm: float
    failed: str | None = None


def svi_step(elbo: ELBO, model, x: Tensor, y: Tensor, optimiser: torch.optim.Optimizer, *,
             dataset_size: int, grad_clip: float | None = None,
             clip_parameters: Iterable[Tensor] | None = None,
             auxiliary: AuxiliaryOptimiser | None = None, **model_kwargs) -> StepResult:
    """One SVI step: the per-token surrogate's gradient, clipping, the optimiser step and the
    auxiliary parameters' step. A non-finite loss or gradient norm skips every update.

    :param clip_parameters: the parameters whose joint norm is clipped to ``grad_clip``
        (default all of ``model``'s); ``grad_clip=None`` measures the norm without clipping.
        Every gradient of ``model``'s parameters must be finite either way.
    :param model_kwargs: ``kl_scale``, ``gate_threshold`` for model and guide.
    """
    loss, surrogate = per_token_loss_and_surrogate(elbo, model, x, y, dataset_size=dataset_size,
                                                   **model_kwargs)
    loss = float(loss)
    if not math.isfinite(loss):
        return StepResult(loss, math.nan, "loss")
    optimiser.zero_grad(set_to_none=True)
    surrogate.backward()
    params = list(model.parameters() if clip_parameters is None else clip_parameters)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(
        params, math.inf if grad_clip is None else grad_clip))
    finite = math.isfinite(grad_norm) and (clip_parameters is None or all(
        bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None))
    if not finite:
        optimiser.zero_grad(set_to_none=True)
        if auxiliary is not None:
            auxiliary.zero_grad()
        return StepResult(loss, grad_norm, "gradient norm")
    optimiser.step()
    if auxiliary is not None:
        auxiliary.step()
    return StepResult(loss, grad_norm)
