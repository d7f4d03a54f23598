"""The contract every ELBO gradient estimator of the registry fulfils.

An estimator is two choices made together: the *family of samplers* the guide uses for its
Dirichlet sites (which decides how gradients flow through the samples: implicit pathwise,
normalised Gamma, rejection-sampler reparameterisation, or none at all) and the *ELBO* whose
surrogate loss turns those samples into a gradient. Model/guide pairs select the sampler through
:meth:`Estimator.dirichlet` and attach :meth:`Estimator.site_infer` to their ``pyro.sample``
calls, so the same program runs under every estimator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO
from torch import Tensor

from bayes_router.core.dirichlet import SAMPLING_DTYPE

#: Where Pyro's ``TraceGraph_ELBO`` keeps each site's decaying-average baseline.
BASELINE_PREFIX = "__baseline_avg_downstream_cost_"


def running_baselines() -> dict[str, Tensor]:
    """Copies of the decaying-average baselines in Pyro's global param store, by name: the
    part of a score-function estimator's state that outlives its ELBO object."""
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in sorted(store.keys())
            if name.startswith(BASELINE_PREFIX)}


def restore_running_baselines(state: dict[str, Tensor], device=None) -> None:
    """Make ``state`` the param store's decaying-average baselines, dropping any others, so a
    run continues from its own (a checkpoint's) and never from another run's in the same
    process."""
    store = pyro.get_param_store()
    for name in [n for n in store.keys() if n.startswith(BASELINE_PREFIX)]:
        del store[name]
    for name, value in state.items():
        store[name] = value.detach().clone().to(device)


class Estimator(ABC):
    """Abstract base of the ELBO gradient estimators.

    The guide of a model/guide pair uses this object in two places::

        infer = estimator.site_infer()
        pyro.sample("alpha_0", estimator.dirichlet(concentration).to_event(1), infer=infer)

    and training or the gradient-variance lab builds the loss with :meth:`make_elbo`.

    :cvar str name: registry name, e.g. ``"reparam-mc"``.
    :cvar bool unbiased: whether the gradient estimate is unbiased for the gradient of the
        (single-sample, standard) ELBO.
    :cvar str reference: the paper the estimator comes from.
    :cvar int min_particles: the fewest particles the estimator is defined for.
    :cvar int warmup_steps: estimates to make and discard before measuring or relying on the
        estimator's variance, so that its running baselines settle (0: it has none).
    :cvar bool pathwise: whether the gradient flows through the sampled values (every
        reparameterised estimator). Pathwise gradients are biased when the likelihood is a
        discontinuous function of the sample, as under training-time gating
        (:func:`~bayes_router.inference.train_config.gated_training_bias`).
    :cvar bool owns_state: whether the ELBO keeps state of its own between steps (running or
        learned baselines, :meth:`state_tensors`): under data parallelism the ranks average it
        after every step, so that it stays one state.
    """

    name: str = ""
    owns_state: bool = False
    unbiased: bool = True
    reference: str = ""
    min_particles: int = 1
    warmup_steps: int = 0
    pathwise: bool = True

    def dirichlet(self, concentration: Tensor) -> dist.TorchDistribution:
        """The Dirichlet distribution the guide must use for its routing-weight sites.

        The concentration is cast to :data:`~bayes_router.core.dirichlet.SAMPLING_DTYPE`
        (``float64``; the cast is differentiable), so samples and log-densities are
        ``float64`` whatever the model's dtype; cast the sample back where it enters a
        ``float32`` network.

        :param concentration: ``(..., K)`` positive concentration.
        :returns: a distribution over the simplex of the last dimension, with batch shape
            ``concentration.shape[:-1]``.
        """
        return self.family(torch.as_tensor(concentration).to(SAMPLING_DTYPE))

    def family(self, concentration: Tensor) -> dist.TorchDistribution:
        """The estimator's Dirichlet class at ``concentration`` (no dtype change); subclasses
        with their own sampler override this, not :meth:`dirichlet`."""
        return dist.Dirichlet(concentration)

    def site_infer(self) -> dict:
        """The ``infer`` dict the guide attaches to its Dirichlet ``pyro.sample`` calls.

        A fresh dict on each call (empty unless the estimator configures baselines).
        """
        return {}

    def state_tensors(self, elbo: ELBO) -> list[Tensor]:
        """Every tensor of the state ``elbo`` keeps between steps (running averages, baseline
        nets), in an order every process agrees on; the data-parallel ranks average them after
        each step. By default the auxiliary parameters and Pyro's decaying-average baselines
        (``__baseline_avg_downstream_cost_<site>`` in the param store)."""
        store = pyro.get_param_store()
        averages = [store[name].data for name in sorted(store.keys())
                    if name.startswith(BASELINE_PREFIX)]
        return [p.data for p in self.auxiliary_parameters(elbo)] + averages

    def auxiliary_parameters(self, elbo: ELBO) -> list[Tensor]:
        """Parameters that ``elbo`` (built by :meth:`make_elbo`) owns and that the caller must
        train beside the model's (learned baselines; created lazily, so ask after each step).
        None by default. :class:`~bayes_router.inference.objective.AuxiliaryOptimiser` trains
        them."""
        return []

    @abstractmethod
    def make_elbo(self, num_particles: int = 1, vectorize_particles: bool = True,
                  **kwargs) -> ELBO:
        """A :class:`~pyro.infer.elbo.ELBO` computing this estimator's surrogate loss.

        :param int num_particles: number of samples per gradient estimate.
        :param bool vectorize_particles: draw the particles in one vectorised pass.
        :param kwargs: further options of the underlying ELBO class (e.g.
            ``max_plate_nesting``).
        :raises ValueError: if ``num_particles`` is below :attr:`min_particles`.
        """
        raise NotImplementedError

    def check_num_particles(self, num_particles: int) -> int:
        """Validate a particle count for this estimator and return it."""
        if isinstance(num_particles, bool) or not isinstance(num_particles, int):
            raise TypeError(f"num_particles must be an int, got {num_particles!r}")
        if num_particles < self.min_particles:
            raise ValueError(
                f"estimator {self.name!r} does not apply with num_particles={num_particles}: "
                f"it needs num_particles >= {self.min_particles}"
            )
        return num_particles

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, unbiased={self.unbiased})"
