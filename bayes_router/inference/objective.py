"""One differentiable objective for every ELBO, and the one SVI step built on it.

:func:`loss_and_surrogate` returns ``(loss value, surrogate to differentiate)`` for any ELBO;
:func:`per_token_loss_and_surrogate` scales them per token; :func:`svi_step` is the step that
training, empirical Bayes and the step timing share, configured once per run by
:class:`StepOptions`; :class:`AuxiliaryOptimiser` trains the parameters an estimator's ELBO
owns.

Pyro's ELBOs expose their surrogate differently: ``Trace_ELBO`` and its subclasses through
``_differentiable_loss_particle``, ``TraceGraph_ELBO`` through ``_loss_and_surrogate_loss``.
Training and the gradient-variance lab need both numbers from one set of traces (the reported
loss must be the ELBO estimate, not the surrogate, whose value differs for score-function
estimators), and they drive the optimiser themselves, so this module asks each ELBO for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceGraph_ELBO
from torch import Tensor
from torch.distributions import Independent, kl_divergence

from bayes_router.core.elbo_surgery import split_kl
from bayes_router.core.validation import check_int, check_positive
from bayes_router.inference.distributed import Distributed
from bayes_router.inference.estimators.reparam_analytic import AnalyticKLELBO


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


def _token_distribution(fn):
    """The per-token distribution of a site: ``fn`` without its ``.to_event`` wrappers, so that
    its batch shape ends in the token axis."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn


class FreeBitsELBO(AnalyticKLELBO):
    """``TraceMeanField_ELBO`` with *free bits* (Kingma et al. 2016, "Improved Variational
    Inference with Inverse Autoregressive Flow"), on the traces of
    :class:`~bayes_router.inference.estimators.reparam_analytic.AnalyticKLELBO` (no
    log-densities it never reads): every latent's analytic KL counts as
    ``max(KL, lambda)``, per token (the last batch dimension once ``.to_event`` is unwrapped)
    and site. A token pays nothing for committing up to ``lambda`` nats, and the KL's gradient
    vanishes below that. **Not an ELBO** for ``lambda > 0``; at ``lambda = 0`` it is
    ``TraceMeanField_ELBO``'s loss exactly. The site's scale (subsampling, ``kl_scale``)
    multiplies the clamped KL.

    :param free_bits: ``lambda >= 0`` in nats.
    """

    def __init__(self, free_bits: float, **kwargs):
        if not (math.isfinite(free_bits) and free_bits >= 0):
            raise ValueError(f"free_bits must be a finite number >= 0, got {free_bits!r}")
        super().__init__(**kwargs)
        self.free_bits = float(free_bits)

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo = 0.0
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo = elbo + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            if guide_site["mask"] is not None:
                raise NotImplementedError("FreeBitsELBO does not support masked sites")
            kl = kl_divergence(_token_distribution(guide_site["fn"]),
                               _token_distribution(model_site["fn"]))
            kl = kl.clamp(min=self.free_bits)
            # the site's scale broadcasts over its batch dims; tokens are the innermost
            scale = guide_site["scale"]
            if isinstance(scale, Tensor) and scale.dim():
                scale = scale.unsqueeze(-1)
            elbo = elbo - scale_and_mask(kl, scale=scale, mask=None).sum()
        loss = -(elbo.detach() if torch._C._get_tracing_state() else float(elbo.detach()))
        return loss, -elbo


class AuxiliaryOptimiser:
    """Adam over the parameters an estimator's ELBO owns (:meth:`Estimator.auxiliary_parameters`,
    e.g. learned baselines). They appear lazily, on first sight of a site, and join on the next
    :meth:`step`. These nets and their Adam state are not checkpointed: a resumed run starts
    them afresh, which changes the variance, not the expectation, of the gradient. (The
    decaying-average baselines of the score-function estimators are: a checkpoint holds them
    as ``running_baselines``.)

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

    def parameters(self) -> list[Tensor]:
        """The auxiliary parameters that exist so far."""
        return list(self.estimator.auxiliary_parameters(self.elbo))

    def state_tensors(self) -> list[Tensor]:
        """The estimator's state between steps (see
        :meth:`~bayes_router.inference.estimators.base.Estimator.state_tensors`)."""
        return self.estimator.state_tensors(self.elbo)

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
    :ivar overflow: with a ``float16`` loss scaler: the scaled gradients overflowed, so the
        scaler lowered its scale and the parameters were left unchanged (expected now and then,
        not a failure).
    """

    loss: float
    grad_norm: float
    failed: str | None = None
    overflow: bool = False


@dataclass(frozen=True, eq=False)
class StepOptions:
    """What :func:`svi_step` does the same way at every step of a run; built (and checked) once,
    before the loop. The per-step inputs (batch, seeds, ``kl_scale``, ``gate_threshold``) are
    :func:`svi_step`'s arguments.

    The auxiliary optimiser, the process group and the loss scaler are held by reference: they
    change as the run goes, the options never do. Options therefore compare by identity.

    :param dataset_size: sequences in the training split: the ``batch`` plate scales each
        minibatch to it, and the loss is divided by ``dataset_size * T`` tokens.
    :param grad_clip: the joint norm of ``clip_parameters`` is clipped to this (``None``: the
        norm is measured, not clipped).
    :param clip_parameters: the parameters whose joint norm is clipped (``None``: all of the
        model's), kept as a tuple. Every gradient of the model's parameters must be finite
        either way.
    :param auxiliary: the optimiser of the parameters the ELBO owns (learned baselines), stepped
        after the model's.
    :param micro_batches: split each batch into this many equal shards and average their
        gradients (gradient accumulation): each shard's loss is itself an estimate of the whole
        ELBO, so the average is the batch's. It must divide every batch.
    :param distributed: a :class:`~bayes_router.inference.distributed.Distributed` group whose
        ranks average their loss and gradients (data parallelism); ``None``: one process.
    :param scaler: a dynamic loss scaler (``float16`` training, see
        :func:`~bayes_router.core.precision.gradient_scaler`): the backward runs on the scaled
        surrogate and the gradients are unscaled before clipping; an overflow skips the update
        and lowers the scale (``StepResult.overflow``).
    :raises ValueError: for a ``dataset_size`` or ``micro_batches`` that is not an integer
        >= 1, or a ``grad_clip`` that is neither ``None`` nor a finite number > 0.
    """

    dataset_size: int
    grad_clip: float | None = None
    clip_parameters: Iterable[Tensor] | None = field(default=None, repr=False)
    auxiliary: AuxiliaryOptimiser | None = None
    micro_batches: int = 1
    distributed: Distributed | None = None
    scaler: torch.amp.GradScaler | None = None

    def __post_init__(self):
        check_int("dataset_size", self.dataset_size)
        check_int("micro_batches", self.micro_batches)
        if self.grad_clip is not None:
            check_positive("grad_clip", self.grad_clip)
        if self.clip_parameters is not None:  # an iterator would be spent by the first step
            object.__setattr__(self, "clip_parameters", tuple(self.clip_parameters))


def svi_step(elbo: ELBO, model, x: Tensor, y: Tensor, optimiser: torch.optim.Optimizer,
             options: StepOptions, *, seeds: Sequence[int] | None = None,
             **model_kwargs) -> StepResult:
    """One SVI step: the per-token surrogate's gradient, clipping, the optimiser step and the
    auxiliary parameters' step. A non-finite loss or gradient norm skips every update.

    :param options: what stays the same for the whole run (:class:`StepOptions`).
    :param seeds: one torch seed per shard (``options.micro_batches`` of them), set before its
        objective (``None``: the RNG runs on): what makes a shard's noise the same as a
        micro-batch and as a process of its own.
    :param model_kwargs: ``kl_scale``, ``gate_threshold`` for model and guide.
    :raises ValueError: when ``options.micro_batches`` does not divide the batch, or ``seeds``
        does not hold one seed per shard.
    """
    dataset_size, grad_clip, clip_parameters = (options.dataset_size, options.grad_clip,
                                                options.clip_parameters)
    auxiliary, micro_batches = options.auxiliary, options.micro_batches
    distributed, scaler = options.distributed, options.scaler
    if x.shape[0] % micro_batches:
        raise ValueError(f"micro_batches ({micro_batches}) must divide the batch "
                         f"({x.shape[0]} sequences)")
    if seeds is not None and len(seeds) != micro_batches:
        raise ValueError(f"seeds must hold one seed per micro-batch ({micro_batches}), got "
                         f"{len(seeds)}")
    optimiser.zero_grad(set_to_none=True)
    losses, refused = [], None
    for i, (xs, ys) in enumerate(zip(x.chunk(micro_batches), y.chunk(micro_batches),
                                     strict=True)):
        if seeds is not None:
            torch.manual_seed(seeds[i])
        try:
            loss, surrogate = per_token_loss_and_surrogate(
                elbo, model, xs, ys, dataset_size=dataset_size, **model_kwargs)
        except ValueError as error:
            # torch's validation of a distribution built from diverged parameters: with other
            # ranks waiting on this one, fail through the averaged loss so that all stop
            if distributed is None or not str(error).startswith("Expected parameter"):
                raise
            refused = str(error).split("\n")[0]
            losses.append(math.nan)
            break
        losses.append(float(loss))
        if math.isfinite(losses[-1]):
            # one shard's graph at a time: accumulation needs no more memory than one shard
            surrogate = surrogate / micro_batches
            (surrogate if scaler is None else scaler.scale(surrogate)).backward()
    loss = sum(losses) / micro_batches
    if distributed is not None:  # every rank decides on the same number
        loss = distributed.mean(loss)
    if not math.isfinite(loss):
        optimiser.zero_grad(set_to_none=True)
        if auxiliary is not None:
            auxiliary.zero_grad()
        if refused is not None:
            raise ValueError(refused)
        return StepResult(loss, math.nan, "loss")
    if distributed is not None:
        distributed.average_gradients(list(model.parameters()))
        if auxiliary is not None:
            distributed.average_gradients(auxiliary.parameters())
    if scaler is not None:
        scaler.unscale_(optimiser)
        scale = scaler.get_scale()
        if auxiliary is not None:  # the auxiliary parameters' gradients were scaled too
            for p in auxiliary.parameters():
                if p.grad is not None:
                    p.grad.div_(scale)
    params = list(model.parameters() if clip_parameters is None else clip_parameters)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(
        params, math.inf if grad_clip is None else grad_clip))
    finite = math.isfinite(grad_norm) and (clip_parameters is None or all(
        bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None))
    if not finite:
        optimiser.zero_grad(set_to_none=True)
        if auxiliary is not None:
            auxiliary.zero_grad()
        if scaler is not None:  # an overflow of the scaled gradients: lower the scale
            scaler.update()
            _share_state(auxiliary, distributed)
            return StepResult(loss, grad_norm, overflow=True)
        return StepResult(loss, grad_norm, "gradient norm")
    if scaler is None:
        optimiser.step()
    else:
        scaler.step(optimiser)
        scaler.update()
    if auxiliary is not None:
        auxiliary.step()
    _share_state(auxiliary, distributed)
    return StepResult(loss, grad_norm)


def _share_state(auxiliary: AuxiliaryOptimiser | None, distributed) -> None:
    """Average an estimator's running and learned baselines over the ranks: each rank's shard
    moved them differently, and the run must keep one state (rank 0 stands for all)."""
    if auxiliary is not None and distributed is not None and auxiliary.estimator.owns_state:
        distributed.average_(auxiliary.state_tensors())


@torch.no_grad()
def objective_terms(model, x: Tensor, y: Tensor) -> dict:
    """The objective's parts on a batch, per token: what the training log records.

    For the Bayesian router one guide sample path (drawn under a forked RNG, so logging never
    changes a run's random stream): ``nll`` (``-log p(y | x, alpha)`` per token),
    ``kl_per_layer`` (analytic ``KL(q || p)`` per token, per layer), ``a0`` (mean total
    concentration per layer) and, from the posterior means ``abar``, ``spread`` (per layer, the
    standard deviation of ``abar_k`` across tokens averaged over experts: 0 when every token
    is routed alike) and ``shares`` (argmax share of each expert per layer). The ELBO surgery
    of each layer's KL over the batch (:func:`~bayes_router.core.elbo_surgery.split_kl`, its
    own seeded generator) gives ``information_per_layer`` (``I(x; alpha)``, the nats spent on
    routing tokens differently) and ``marginal_kl_per_layer`` (``KL(qbar || p)``, the nats
    spent moving the static allocation); the two add up to ``kl_per_layer``. Routers without
    latents report their deterministic weights, KL 0 (and both parts 0) and ``a0`` ``None``.
    """
    # fork the RNG of the device the batch is on too: logging never moves a CUDA run's stream
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        bayesian = hasattr(model, "prior_concentration")
        if bayesian:
            out = model.guide(x)
            model.clear_cache()
            prior = model.prior_concentration().detach().to(torch.float64)
            concentration = [r.decision.concentration.to(torch.float64) for r in out.routing]
            splits = [split_kl(a, prior[layer]) for layer, a in enumerate(concentration)]
            kl = [s.kl for s in splits]
            information = [s.information for s in splits]
            a0 = [float(a.sum(-1).mean()) for a in concentration]
            abar = [a / a.sum(-1, keepdim=True) for a in concentration]
        else:
            out = model.predict(x)
            abar = [r.decision.mean.to(torch.float64) for r in out.routing]
            kl, a0 = [0.0] * len(abar), None
            information = kl
    nll = float(torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1)))
    K = abar[0].shape[-1]
    flat = [w.reshape(-1, K) for w in abar]
    return {"nll": nll, "kl": float(sum(kl)), "kl_per_layer": kl,
            "information_per_layer": information,
            "marginal_kl_per_layer": [k - i for k, i in zip(kl, information, strict=True)],
            "a0": a0,
            "spread": [float(w.std(0, unbiased=False).mean()) for w in flat],
            "shares": [torch.bincount(w.argmax(-1), minlength=K).div(w.shape[0]).tolist()
                       for w in flat]}
