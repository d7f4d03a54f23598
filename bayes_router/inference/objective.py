"""One differentiable objective for every ELBO: ``(loss value, surrogate to differentiate)``.

Pyro's ELBOs expose their surrogate differently: ``Trace_ELBO`` and its subclasses through
``_differentiable_loss_particle``, ``TraceGraph_ELBO`` through ``_loss_and_surrogate_loss``.
Training and the gradient-variance lab need both numbers from one set of traces (the reported
loss must be the ELBO estimate, not the surrogate, whose value differs for score-function
estimators), and they drive the optimiser themselves, so this module asks each ELBO for them.
"""

from __future__ import annotations

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
