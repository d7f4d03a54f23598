"""Attention experts, the routed layer, TinyLM, and the Bayesian / prior-free routed LMs."""

from bayes_router.models.bayesian import BayesianRoutedLM, alpha_site
from bayes_router.models.config import TinyLMConfig
from bayes_router.models.controller import Controller, controller_features
from bayes_router.models.experts import (
    SEED_COSTS,
    AttentionExpert,
    FullAttention,
    LinearAttention,
    LocalAttention,
    build_expert,
    cost_vector,
    expert_flops,
    expert_names,
    naive_full,
    naive_linear,
    naive_local,
    register_expert,
)
from bayes_router.models.prior_free import PriorFreeRoutedLM
from bayes_router.models.priors import compute_aware_prior, seed_prior
from bayes_router.models.routed_lm import BATCH_PLATE, OBS_SITE, RoutedLM
from bayes_router.models.router import (
    ROUTING_MODES,
    LayerCache,
    LayerRouting,
    RoutedAttention,
    Router,
    RoutingDecision,
    routing_weights,
)
from bayes_router.models.static import StaticRoutedLM, parse_static_router
from bayes_router.models.tinylm import DecodeCache, FixedRouting, LMOutput, TinyLM

__all__ = [
    "BATCH_PLATE",
    "OBS_SITE",
    "ROUTING_MODES",
    "SEED_COSTS",
    "AttentionExpert",
    "BayesianRoutedLM",
    "Controller",
    "DecodeCache",
    "FixedRouting",
    "FullAttention",
    "LMOutput",
    "LayerCache",
    "LayerRouting",
    "LinearAttention",
    "LocalAttention",
    "PriorFreeRoutedLM",
    "RoutedAttention",
    "RoutedLM",
    "Router",
    "RoutingDecision",
    "StaticRoutedLM",
    "TinyLM",
    "TinyLMConfig",
    "alpha_site",
    "build_expert",
    "compute_aware_prior",
    "controller_features",
    "cost_vector",
    "expert_flops",
    "expert_names",
    "naive_full",
    "naive_linear",
    "naive_local",
    "parse_static_router",
    "register_expert",
    "routing_weights",
    "seed_prior",
]
