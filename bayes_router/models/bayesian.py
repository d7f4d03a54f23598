"""The Bayesian router as a Pyro model/guide pair.

Model (per layer ``l`` and sequence ``b`` in a subsampled ``batch`` plate)::

    alpha_l[b, t] ~ Dirichlet(beta_l)                  # compute-aware prior
    y[b, t]       ~ Categorical(logits = LM(x; alpha)_t)

Guide::

    alpha_l[b, t] ~ Dirichlet(softplus(MLP_phi_l(features_l[b, t])) + floor_l)

Two priors (``prior=``, see :mod:`bayes_router.models.priors`): ``"power"``,
``beta_l = beta0[l] * pi`` with ``pi ∝ c^-eta`` (or a learned per-layer ``pi_l``) and
``floor_l = a_min``; ``"seed"``, the public prototype's ``beta_l = epsilon + beta0[l] (1 - c)``
with ``floor_l = beta_l``.

Tokens are an *event* dimension of the ``alpha_l`` and ``obs`` sites, not a plate: in a causal LM
``alpha_l[t]`` influences every ``y[t' >= t]``, so a token plate would be a false
conditional-independence statement, and Pyro's score-function estimators (``Trace_ELBO`` without
reparameterisation, ``TraceGraph_ELBO``) would silently drop the cross-token terms of the gradient.

**One forward pass per particle.** The guide must run the network to compute each layer's input,
and the model needs the logits of the same network under the same samples. The guide memoises
its logits keyed by the identity of its inputs and sample tensors, the routing mode, the grad
mode and the version counters of every parameter; the model, replayed against the guide trace,
receives those very tensors and reuses the logits (the autograd graph is the same one). Any
change in between (an optimiser step, ``load_state_dict``, a guide traced under
``torch.no_grad()`` and a model replayed with grad on) makes the model compute the network
itself, as it does when run on its own (prior predictive, or under other samples).
:meth:`BayesianRoutedLM.clear_cache` drops the memo.

**Dirichlet maths in float64.** The Dirichlet sites (prior, guide, their samples and
log-densities) are ``float64`` whatever the network's dtype (see
:data:`~bayes_router.core.dirichlet.SAMPLING_DTYPE`): ``float32`` draws at the guide
floor underflow, giving NaN gradients and biased estimates. Samples are cast to the network's
dtype where they weight the experts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Protocol

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import TorchDistribution
from pyro.nn import PyroParam
from torch import Tensor
from torch.distributions import constraints

from bayes_router.core.commitment import floor_kl
from bayes_router.core.dirichlet import (
    SAMPLING_DTYPE,
    aleatoric_uncertainty,
    epistemic_uncertainty,
    normalised_entropy,
    total_uncertainty,
)
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.priors import (
    RoutingPrior,
    _power_prior,
    _seed_prior,
    check_concentration,
    check_costs,
    check_prior_options,
)
from bayes_router.models.routed_lm import RoutedLM
from bayes_router.models.router import RoutingDecision
from bayes_router.models.tinylm import LMOutput

logger = logging.getLogger(__name__)

#: The Bayesian router's routing-uncertainty measures (nats), by name.
GATE_MEASURES = {"total": total_uncertainty, "aleatoric": aleatoric_uncertainty,
                 "epistemic": epistemic_uncertainty}


def alpha_site(layer: int) -> str:
    """Name of the routing-weight sample site of ``layer`` (shared by model and guide)."""
    return f"alpha_{layer}"


class DirichletFamily(Protocol):
    """What the guide needs from an ELBO estimator: the Dirichlet sampler its ``alpha`` sites use
    and their ``infer`` options. Every :class:`~bayes_router.inference.estimators.Estimator`
    is one; the code that builds the model passes it in (the model looks nothing up by name)."""

    def dirichlet(self, concentration: Tensor) -> TorchDistribution: ...

    def site_infer(self) -> dict: ...


class DefaultDirichletFamily:
    """``torch``'s implicitly reparameterised Dirichlet in :data:`SAMPLING_DTYPE`, no site
    options: the family of ``reparam-mc``, ``reparam-analytic``, ``stl``, ``iwae`` and ``dreg``."""

    def dirichlet(self, concentration: Tensor) -> TorchDistribution:
        return dist.Dirichlet(torch.as_tensor(concentration).to(SAMPLING_DTYPE))

    def site_infer(self) -> dict:
        return {}


def _sample_decision(alpha: Tensor, dtype: torch.dtype, gated: bool) -> RoutingDecision:
    """The routing decision of a sampled ``alpha``, cast to the network's ``dtype``.

    Its uncertainty, the normalised entropy of the sample, is what training-time gating
    compares with the gate threshold (confident samples route hard to their argmax): a
    deterministic function of the sample, so model and guide compute the same likelihood.
    Only a ``gated`` pass reads it; a soft pass leaves it ``None`` (its entropy in float64 is
    several operations a layer that nothing reads).
    """
    weights = alpha.to(dtype)
    uncertainty = normalised_entropy(alpha).to(dtype) if gated else None
    return RoutingDecision(weights=weights, mean=weights, uncertainty=uncertainty)


class BayesianRoutedLM(RoutedLM):
    """Routed LM with a compute-aware Dirichlet prior over routing weights and a Dirichlet guide.

    :param cfg: the LM configuration.
    :param beta0: prior concentration: a positive scalar, one value per layer, or ``"learn"``
        (type-II maximum likelihood: ``beta0`` becomes a positive ``pyro.param`` of the model).
    :param eta: cost sensitivity of the prior mean ``pi ∝ c^-eta``.
    :param a_min: floor added to the guide's concentrations.
    :param estimator: the ELBO estimator (any :class:`DirichletFamily`), whose Dirichlet sampler
        and site options the guide uses; ``None``: :class:`DefaultDirichletFamily`. Build it with
        :func:`~bayes_router.inference.estimators.get_estimator`.
    :param beta0_init: initial value when ``beta0 == "learn"``.
    :param prior: ``"power"``: ``beta0 * pi`` with ``pi ∝ c^-eta`` and the guide
        ``softplus(MLP) + a_min``; ``"seed"``: the public prototype's
        :func:`~bayes_router.models.priors.seed_prior` with
        the guide ``beta + softplus(MLP)`` (``a_min`` and ``eta`` unused).
    :param prior_mean: ``"fixed"``, or ``"learn"``: the per-layer prior mean ``pi_l`` becomes a
        ``pyro.param`` on the simplex (initialised at ``c^-eta``), fitted by type-II maximum
        likelihood with the rest (``prior="power"`` only).
    """

    kind = "bayesian"

    def __init__(self, cfg: TinyLMConfig, beta0: float | Sequence[float] | str = 1.0,
                 eta: float = 1.0, a_min: float = 0.05,
                 estimator: DirichletFamily | None = None, beta0_init: float = 1.0,
                 costs: Tensor | None = None, prior: str = "power", prior_mean: str = "fixed"):
        super().__init__(cfg, costs)
        if cfg.n_experts < 2:
            raise ValueError(f"the Bayesian router needs at least 2 experts, got "
                             f"{list(cfg.experts)} (train a one-expert LM with router "
                             f"'fixed:{cfg.experts[0]}')")
        check_prior_options(beta0=beta0, eta=eta, a_min=a_min, beta0_init=beta0_init,
                            prior=prior, prior_mean=prior_mean, n_layers=cfg.n_layers)
        if prior == "seed":
            check_costs(self.costs, "seed")  # RoutedLM checked them > 0; the seed prior needs <= 1
        self.prior, self.learn_prior_mean = prior, prior_mean == "learn"
        if isinstance(estimator, str):
            raise TypeError(f"estimator must be an estimator object, not the name {estimator!r}: "
                            "build it with bayes_router.inference.get_estimator(name)")
        if estimator is not None and not (callable(getattr(estimator, "dirichlet", None))
                                          and callable(getattr(estimator, "site_infer", None))):
            raise TypeError(f"estimator must provide dirichlet() and site_infer(), got "
                            f"{type(estimator).__name__}")
        self.a_min, self.eta = float(a_min), float(eta)
        self.estimator = DefaultDirichletFamily() if estimator is None else estimator
        self.learn_beta0 = isinstance(beta0, str)  # "learn": the only name allowed
        if self.learn_beta0:
            self.beta0 = PyroParam(torch.full((cfg.n_layers,), float(beta0_init)),
                                   constraint=constraints.positive)
        else:
            values = torch.as_tensor(beta0, dtype=torch.float32)
            self.register_buffer("beta0_fixed", values.expand(cfg.n_layers).clone())
        if self.learn_prior_mean:
            pi = _power_prior(self.costs, 1.0, self.eta)
            self.prior_mean_param = PyroParam(pi.expand(cfg.n_layers, -1).clone(),
                                              constraint=constraints.simplex)
        if not self.learn_beta0 and not self.learn_prior_mean:
            smallest = float(self.prior_concentration().min())
            if prior == "power" and smallest < self.a_min:
                logger.warning(
                    "the prior concentration beta0 * pi has an entry %.3g below a_min=%.3g: "
                    "no guide can match the prior, so every token pays a KL floor of %.3g nats "
                    "per layer (lower --a-min, e.g. to %.2g, to study such beta0)",
                    smallest, self.a_min, self.floor_kl(), smallest / 2)
        # (key, samples, logits) of the last guide run, reused by a model replayed on it
        self._memo: tuple | None = None
        self.one_pass = True  # False: the naive pair, the model reruns the network (reference)

    def clear_cache(self) -> None:
        """Drop the guide's memoised logits (see the module docstring)."""
        self._memo = None

    def _memo_key(self, x: Tensor, mode: str, threshold: float | None) -> tuple:
        versions = tuple(p._version for p in self.parameters())
        return (id(x), mode, threshold, torch.is_grad_enabled(), versions)

    # -- prior and guide distributions -----------------------------------------------------------

    def prior_concentration(self) -> Tensor:
        """``(L, K)`` Dirichlet concentration of the prior in force."""
        if self.prior == "seed":
            return _seed_prior(self.costs, self.current_beta0())
        if self.learn_prior_mean:
            return self.current_beta0()[:, None] * self.prior_mean_param
        return _power_prior(self.costs, self.current_beta0(), self.eta)

    def guide_floor(self) -> Tensor:
        """``(L, K)`` lower bound of the guide's concentration: ``a_min`` (``power``) or the
        prior concentration itself (``seed``)."""
        if self.prior == "seed":
            return self.prior_concentration()
        return torch.full((self.cfg.n_layers, self.cfg.n_experts), self.a_min,
                          dtype=self.costs.dtype, device=self.costs.device)

    def floor_kl(self) -> float:
        """The largest over layers of the smallest KL any admissible guide pays per token
        (0 unless ``beta0 * pi`` falls below ``a_min``); see
        :func:`~bayes_router.core.commitment.floor_kl`."""
        prior = self.prior_concentration().detach().double().numpy()
        floor = self.guide_floor().detach().double().numpy()
        return max(floor_kl(b, f) for b, f in zip(prior, floor, strict=True))

    def current_beta0(self) -> Tensor:
        """``(L,)`` prior concentration ``beta0`` in force (learned or fixed)."""
        return self.beta0 if self.learn_beta0 else self.beta0_fixed

    def with_learned_beta0(self, beta0: float | Sequence[float] | Tensor | None = None,
                           estimator: DirichletFamily | None = None) -> BayesianRoutedLM:
        """A copy whose ``beta0`` is a learned parameter (type-II maximum likelihood), with every
        other parameter and buffer copied.

        :param beta0: its initial value, a scalar or one per layer; default this model's.
        :param estimator: the copy's Dirichlet family; default this model's.
        """
        if beta0 is None:
            values = self.current_beta0().detach().clone()
        else:
            check_concentration("beta0", beta0, self.cfg.n_layers)
            values = torch.as_tensor(beta0, dtype=torch.float32).reshape(-1).expand(
                self.cfg.n_layers).clone()
        copy = BayesianRoutedLM(self.cfg, beta0="learn", eta=self.eta, a_min=self.a_min,
                                estimator=self.estimator if estimator is None else estimator,
                                costs=self.costs, prior=self.prior,
                                prior_mean="learn" if self.learn_prior_mean else "fixed")
        state = {k: v for k, v in self.state_dict().items()
                 if k not in ("beta0_fixed", "beta0_unconstrained")}
        result = copy.load_state_dict(state, strict=False)
        if result.unexpected_keys or len(result.missing_keys) != 1:
            raise RuntimeError(f"with_learned_beta0: state mismatch {result}")
        copy.beta0 = values  # a PyroParam: stored through its constraint's inverse transform
        copy.one_pass = self.one_pass
        return copy

    def concentration(self, layer: int, features: Tensor) -> tuple[Tensor, Tensor]:
        """Guide concentration ``a = softplus(MLP(features)) + floor`` (:meth:`guide_floor`)
        and the raw logits."""
        logits = self.controllers[layer](features)
        if self.prior == "seed":
            return F.softplus(logits) + self.prior_concentration()[layer].to(logits.dtype), logits
        return F.softplus(logits) + self.a_min, logits

    # -- the Pyro program pair -------------------------------------------------------------------

    def model(self, x: Tensor, y: Tensor | None = None, dataset_size: int | None = None,
              kl_scale: float = 1.0, gate_threshold: float = 0.0) -> Tensor:
        """The Pyro model: compute-aware Dirichlet priors, then the observed next tokens.

        :param dataset_size: size of the ``batch`` plate (the subsampling scale).
        :param kl_scale: factor on the ``alpha`` sites' log-densities (KL annealing or weight;
            the ELBO at 1).
        :param gate_threshold: training-time gate (0: soft routing); see
            :func:`~bayes_router.inference.train_config.gated_training_bias` for what it does to
            pathwise gradients.
        """
        self._check_batch(x, y)
        mode, threshold = self._training_mode(gate_threshold)
        prior = self.prior_concentration().to(SAMPLING_DTYPE)
        T, K = x.shape[1], self.cfg.n_experts
        with self._plate(x, dataset_size):
            with poutine.scale(scale=kl_scale):
                alphas = tuple(
                    pyro.sample(alpha_site(layer),
                                RoutingPrior(prior[layer].expand(T, K)).to_event(1))
                    for layer in range(self.cfg.n_layers)
                )
            memo, self._memo = self._memo, None
            if (memo is not None and memo[0] == self._memo_key(x, mode, threshold)
                    and all(a is b for a, b in zip(memo[1], alphas, strict=True))):
                logits = memo[2]
            else:
                dtype = self.lm.token_embedding.weight.dtype
                gated = mode == "gated"
                logits = self.lm(x, lambda layer, f: _sample_decision(alphas[layer], dtype, gated),
                                 mode=mode, gate_threshold=threshold, tokens_checked=True).logits
            self._observe(logits, y)
        return logits

    def guide(self, x: Tensor, y: Tensor | None = None, dataset_size: int | None = None,
              kl_scale: float = 1.0, gate_threshold: float = 0.0) -> LMOutput:
        """The Pyro guide: ``alpha_l ~ Dir(softplus(MLP(features_l)) + a_min)``, layer by layer
        (layer ``l``'s features depend on the samples of the layers below). Arguments as
        :meth:`model`."""
        self._check_batch(x, y)
        mode, threshold = self._training_mode(gate_threshold)
        infer = self.estimator.site_infer()
        samples = []

        def router(layer: int, features: Tensor) -> RoutingDecision:
            concentration, logits = self.concentration(layer, features)
            with poutine.scale(scale=kl_scale):
                alpha = pyro.sample(alpha_site(layer),
                                    self.estimator.dirichlet(concentration).to_event(1),
                                    infer=dict(infer))
            samples.append(alpha)
            decision = _sample_decision(alpha, features.dtype, mode == "gated")
            decision.concentration, decision.logits = concentration, logits
            return decision

        with self._plate(x, dataset_size):
            out = self.lm(x, router, mode=mode, gate_threshold=threshold, tokens_checked=True)
        if self.one_pass:
            self._memo = (self._memo_key(x, mode, threshold), tuple(samples), out.logits)
        return out

    # -- evaluation ------------------------------------------------------------------------------

    def decision(self, layer: int, features: Tensor, gate_measure: str = "total"
                 ) -> RoutingDecision:
        """Posterior-mean routing with the guide's uncertainty (for hard and gated modes)."""
        if gate_measure not in GATE_MEASURES:
            raise ValueError(f"gate_measure must be one of {sorted(GATE_MEASURES)}, got "
                             f"{gate_measure!r}")
        concentration, logits = self.concentration(layer, features)
        mean = concentration / concentration.sum(-1, keepdim=True)
        # only the measure asked for (a decoding step pays for every one it computes)
        uncertainty = GATE_MEASURES[gate_measure](concentration) / math.log(self.cfg.n_experts)
        return RoutingDecision(weights=mean, mean=mean, uncertainty=uncertainty,
                               concentration=concentration, logits=logits)

    def sample_predict(self, x: Tensor, num_samples: int) -> Tensor:
        """Bayesian model average: mean predictive probabilities over routing samples ``(B,T,V)``.

        Layers are sampled in order (layer ``l``'s guide depends on the samples below it), with
        all ``num_samples`` samples vectorised along a leading dimension.
        """
        def router(layer: int, features: Tensor) -> RoutingDecision:
            concentration, _ = self.concentration(layer, features)
            if concentration.dim() == 3:
                concentration = concentration.expand(num_samples, *concentration.shape)
            alpha = dist.Dirichlet(concentration).sample()
            return RoutingDecision(weights=alpha, mean=alpha)

        logits = self.lm(x, router).logits  # (S, B, T, V)
        return logits.softmax(-1).mean(0)
