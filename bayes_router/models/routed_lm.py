"""What every routed LM shares: the TinyLM with its controllers and cost vector, evaluation.

:class:`RoutedLM` holds the network, one :class:`~bayes_router.models.controller.Controller`
per layer (none for a static router) and the experts' cost vector; it evaluates
(:meth:`~RoutedLM.predict`: the posterior-mean or softmax routing of :meth:`~RoutedLM.decision`,
the whole sequence or, with a :class:`~bayes_router.models.tinylm.DecodeCache`, a prefill or a
decoding step) and gives its subclasses the pieces of a Pyro program: the subsampled ``batch``
plate (:data:`BATCH_PLATE`) and the observed next tokens (:data:`OBS_SITE`).
:class:`DeterministicRoutedLM` is the Pyro pair of a router without latent variables, the
likelihood alone; the Bayesian router writes its own
(:class:`~bayes_router.models.bayesian.BayesianRoutedLM`).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from bayes_router.models.config import TinyLMConfig
from bayes_router.models.controller import Controller
from bayes_router.models.experts import cost_vector
from bayes_router.models.router import RoutingDecision, check_gate_threshold, random_gate
from bayes_router.models.tinylm import DecodeCache, LMOutput, TinyLM

OBS_SITE = "obs"
BATCH_PLATE = "batch"


class RoutedLM(PyroModule):
    """Base of every routed LM: the TinyLM, one controller per layer (or none), the cost vector.

    Subclasses provide ``model(x, y, dataset_size)``, ``guide(x, y, dataset_size)`` and
    :meth:`decision` (the evaluation-time routing of a layer).
    """

    kind = ""

    def __init__(self, cfg: TinyLMConfig, costs: Tensor | None = None, controllers: bool = True):
        super().__init__()
        self.cfg = cfg
        self.lm = TinyLM(cfg)
        self.controllers = nn.ModuleList(
            Controller(self.lm.feature_dim, cfg.controller_hidden, cfg.n_experts)
            for _ in range(cfg.n_layers if controllers else 0)
        )
        costs = cost_vector(cfg) if costs is None else torch.as_tensor(costs, dtype=torch.float32)
        if costs.shape != (cfg.n_experts,) or not bool((costs > 0).all()) or not bool(
                torch.isfinite(costs).all()):
            raise ValueError(f"costs must hold {cfg.n_experts} positive finite values, got "
                             f"{costs}")
        self.register_buffer("costs", costs)

    def set_precision(self, dtype: str | torch.dtype | None) -> None:
        """Run the LM's matmuls in ``dtype`` under autocast (see
        :meth:`~bayes_router.models.tinylm.TinyLM.set_precision`): the routing controllers,
        the Dirichlet sites and the likelihood stay in full precision."""
        self.lm.set_precision(dtype)

    def _check_batch(self, x: Tensor, y: Tensor | None) -> None:
        """The Pyro pair's boundary: token ids ``x`` and next tokens ``y`` as
        :meth:`~bayes_router.models.tinylm.TinyLM.check_tokens` wants them, of one shape. The
        LM passes behind it trust ``x`` (``tokens_checked=True``)."""
        self.lm.check_tokens(x)
        if y is None:
            return
        self.lm.check_tokens(y, "y")
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")

    def _plate(self, x: Tensor, dataset_size: int | None):
        B = x.shape[0]
        size = B if dataset_size is None else int(dataset_size)
        if size < B:
            raise ValueError(f"dataset_size ({size}) must be >= the batch size ({B})")
        return pyro.plate(BATCH_PLATE, size, subsample=torch.arange(B, device=x.device), dim=-1)

    def _observe(self, logits: Tensor, y: Tensor | None) -> None:
        pyro.sample(OBS_SITE, dist.Categorical(logits=logits).to_event(1), obs=y)

    @staticmethod
    def _training_mode(gate_threshold: float) -> tuple[str, float | None]:
        """Routing mode of a training pass: gated above a zero threshold, soft otherwise."""
        check_gate_threshold(gate_threshold)
        return ("gated", float(gate_threshold)) if gate_threshold > 0 else ("soft", None)

    def decision(self, layer: int, features: Tensor, gate_measure: str = "total"
                 ) -> RoutingDecision:
        raise NotImplementedError

    def predict(self, x: Tensor, mode: str = "soft", gate_threshold: float | None = None,
                gate_measure: str = "total", cache: DecodeCache | None = None,
                lengths: Tensor | None = None, generator: torch.Generator | None = None
                ) -> LMOutput:
        """Evaluation forward pass with the posterior-mean (or softmax) routing in ``mode``;
        with a ``cache``, a prefill or a decoding step (see
        :meth:`~bayes_router.models.tinylm.TinyLM.forward`).

        :param gate_measure: the uncertainty gated routing reads (see :meth:`decision`), or
            ``"random"``: a uniform draw from ``generator`` in its place (:func:`~bayes_router.
            models.router.random_gate`), the control at a soft fraction of ``1 -
            gate_threshold``.
        """
        if gate_measure == "random":
            return self.lm(x, random_gate(lambda layer, f: self.decision(layer, f), generator),
                           mode=mode, gate_threshold=gate_threshold, cache=cache,
                           lengths=lengths)
        return self.lm(x, lambda layer, f: self.decision(layer, f, gate_measure), mode=mode,
                       gate_threshold=gate_threshold, cache=cache, lengths=lengths)


class DeterministicRoutedLM(RoutedLM):
    """A routed LM without latent variables: its Pyro model has only the ``obs`` site and its
    guide is empty, so the same SVI loop trains it on the log-likelihood (its ELBO), through the
    same code path as the Bayesian router. Subclasses provide :meth:`decision`."""

    def model(self, x: Tensor, y: Tensor | None = None, dataset_size: int | None = None,
              kl_scale: float = 1.0, gate_threshold: float = 0.0) -> Tensor:
        self._check_batch(x, y)
        mode, threshold = self._training_mode(gate_threshold)
        with self._plate(x, dataset_size):
            # the evaluation pass of predict (its decision, gate measure "total") on checked x
            logits = self.lm(x, self.decision, mode=mode, gate_threshold=threshold,
                             tokens_checked=True).logits
            self._observe(logits, y)
        return logits

    def guide(self, x: Tensor, y: Tensor | None = None, dataset_size: int | None = None,
              kl_scale: float = 1.0, gate_threshold: float = 0.0) -> None:
        self._check_batch(x, y)
