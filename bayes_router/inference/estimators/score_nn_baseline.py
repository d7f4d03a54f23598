"""Score-function gradients with a learned neural baseline (NVIL-style, ``TraceGraph_ELBO``).

Paper: Mnih, Gregor (2014), *Neural Variational Inference and Learning in Belief Networks*.
Unbiased (the baseline never sees the current sample).
"""

from __future__ import annotations

import functools
import zlib

import pyro
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer import TraceGraph_ELBO
from torch import Tensor, nn

from bayes_router.inference.estimators._util import unwrap_independent
from bayes_router.inference.estimators.base import Estimator
from bayes_router.inference.estimators.score import ScoreFunctionDirichlet


class DirichletBaselineNet(nn.Module):
    """Predicts a Dirichlet site's downstream cost from its concentration ``(..., K) -> (...)``.

    Inputs are ``log a`` and ``log a0``; the output layer starts at zero, so the net begins as
    the plain decaying-average baseline and learns the input-dependent residual.
    """

    def __init__(self, num_categories: int, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_categories + 1, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, concentration: Tensor) -> Tensor:
        log_a = concentration.log()
        features = torch.cat([log_a, log_a.logsumexp(-1, keepdim=True)], -1)  # (..., K + 1)
        return self.net(features).squeeze(-1)


def _site_baseline(net: DirichletBaselineNet, reinterpreted_ndims: int,
                   concentration: Tensor) -> Tensor:
    """Per-Dirichlet predictions summed over ``.to_event`` dims, shaped like Pyro's cost."""
    baseline = sum_rightmost(net(concentration), reinterpreted_ndims)
    while baseline.dim() and baseline.shape[0] == 1:  # as MultiFrameTensor.sum_to does
        baseline = baseline.squeeze(0)
    return baseline


class NeuralBaselineTraceGraph_ELBO(TraceGraph_ELBO):
    """``TraceGraph_ELBO`` that attaches a learned baseline to every score-function Dirichlet site.

    For each non-reparameterised guide site whose distribution is a (possibly ``.to_event``
    wrapped) Dirichlet and whose ``infer`` dict names no baseline of its own, the site gets
    a decaying-average baseline plus a :class:`DirichletBaselineNet` of the site's detached,
    plate-expanded concentration. The nets are built on first sight of a site (the number of
    categories is read from it), initialised from the site's name (the same in every process,
    and the run's random stream is not drawn from), and registered with :func:`pyro.module` under
    ``nn_baseline.<site>`` while the loss is computed, so :class:`~pyro.infer.SVI`, which
    records every parameter touched during ``loss_and_grads``, trains them with the rest.
    Their squared-error loss reaches only their own parameters.

    :param int hidden: hidden width of the baseline nets.
    :param float baseline_beta: decay of the running-average part of the baseline.
    """

    def __init__(self, hidden: int = 16, baseline_beta: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        self.hidden = int(hidden)
        self.baseline_beta = float(baseline_beta)
        self.baselines = nn.ModuleDict()

    def _baseline_net(self, site_name: str, concentration: Tensor) -> nn.Module:
        key = site_name.replace(".", "_")
        if key not in self.baselines:
            # initialised from the site's name, not the run's random stream: every process
            # (every rank of a data-parallel run) builds the same net, and building it draws
            # nothing from the stream that the samples come from. Built on the CPU, so only
            # the CPU generator is seeded (torch.manual_seed would reseed every device's
            # stream too, which the fork does not restore) and then restored by the fork.
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(zlib.crc32(key.encode()))
                net = DirichletBaselineNet(concentration.shape[-1], self.hidden)
            self.baselines[key] = net.to(concentration)
        return pyro.module(f"nn_baseline.{key}", self.baselines[key])

    def _loss_and_surrogate_loss_particle(self, model_trace, guide_trace):
        for name, site in guide_trace.nodes.items():
            if (site["type"] != "sample" or site["fn"].has_rsample
                    or "baseline" in site["infer"]):
                continue
            base, ndims = unwrap_independent(site["fn"])
            if not isinstance(base, torch.distributions.Dirichlet):
                continue
            net = self._baseline_net(name, base.concentration)
            site["infer"] = {**site["infer"], "baseline": {
                "nn_baseline": functools.partial(_site_baseline, net, ndims),
                "nn_baseline_input": base.concentration,
                "use_decaying_avg_baseline": True,
                "baseline_beta": self.baseline_beta,
            }}
        return super()._loss_and_surrogate_loss_particle(model_trace, guide_trace)


class ScoreNNBaseline(Estimator):
    """Score function with downstream-cost Rao-Blackwellisation and a learned neural baseline.

    As :class:`~bayes_router.inference.estimators.score_baseline.ScoreBaseline`, but the
    baseline of each Dirichlet site is a running average plus a small network of the site's
    concentration, fitted to the downstream cost by squared error (Mnih and Gregor's
    input-dependent baseline with centring). The guide needs no per-site wiring:
    :meth:`site_infer` is empty and :class:`NeuralBaselineTraceGraph_ELBO` attaches the
    baselines while computing the loss. The baseline depends on the guide's parameters only,
    never on the current sample, so the estimator is unbiased whatever the nets have learned;
    their training only lowers the variance.

    :param int hidden: hidden width of the baseline nets.
    :param float baseline_beta: decay of the running-average part of the baseline.

    References

    [1] `Neural Variational Inference and Learning in Belief Networks`,
        Andriy Mnih, Karol Gregor (ICML 2014)

    [2] `Gradient Estimation Using Stochastic Computation Graphs`,
        John Schulman, Nicolas Heess, Theophane Weber, Pieter Abbeel (NeurIPS 2015)
    """

    pathwise = False
    warmup_steps = 20
    name = "score-nn-baseline"
    owns_state = True
    unbiased = True
    reference = ("Mnih, Gregor (2014), Neural Variational Inference and Learning in Belief "
                 "Networks")

    def __init__(self, hidden: int = 16, baseline_beta: float = 0.9):
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if not 0.0 <= baseline_beta < 1.0:
            raise ValueError(f"baseline_beta must be in [0, 1), got {baseline_beta}")
        self.hidden = int(hidden)
        self.baseline_beta = float(baseline_beta)

    def family(self, concentration: Tensor) -> ScoreFunctionDirichlet:
        return ScoreFunctionDirichlet(concentration)

    def auxiliary_parameters(self, elbo: NeuralBaselineTraceGraph_ELBO) -> list[Tensor]:
        """The baseline nets' parameters (the nets appear on first sight of each site)."""
        return list(elbo.baselines.parameters())

    def make_elbo(self, num_particles: int = 1, vectorize_particles: bool = True,
                  **kwargs) -> NeuralBaselineTraceGraph_ELBO:
        return NeuralBaselineTraceGraph_ELBO(
            hidden=self.hidden, baseline_beta=self.baseline_beta,
            num_particles=self.check_num_particles(num_particles),
            vectorize_particles=vectorize_particles, **kwargs)
