"""Attention experts, one module each, with their naive twins, the registry and the FLOP model.

Laid out as flash-linear-attention lays out its kernels: ``base`` (the contract every expert
fulfils and the row helpers of the sparse path), ``full``, ``linear``, ``local`` (one expert
each), ``naive`` (the obviously correct twins the tests compare against, reached through each
expert's ``naive`` method), ``registry`` (names to classes) and ``cost`` (the FLOP model and the
cost vector). Each expert also keeps a decoding state (``KVCache`` for ``full``,
``WindowCache`` for ``local``, ``LinearState`` for ``linear``). A new expert is a new module
with an :class:`AttentionExpert` subclass, registered with :func:`register_expert`.
"""

from bayes_router.models.experts.base import AttentionExpert, ExpertState, KVCache
from bayes_router.models.experts.cost import (
    SEED_COSTS,
    cost_vector,
    expert_flops,
    projection_flops_per_token,
)
from bayes_router.models.experts.full import FullAttention
from bayes_router.models.experts.linear import LinearAttention, LinearState
from bayes_router.models.experts.local import LocalAttention, WindowCache
from bayes_router.models.experts.naive import (
    elu_feature_map,
    naive_full,
    naive_linear,
    naive_local,
)
from bayes_router.models.experts.registry import (
    ExpertSpec,
    build_expert,
    expert_names,
    expert_spec,
    register_expert,
    unregister_expert,
)

__all__ = [
    "SEED_COSTS",
    "AttentionExpert",
    "ExpertSpec",
    "ExpertState",
    "FullAttention",
    "KVCache",
    "LinearAttention",
    "LinearState",
    "LocalAttention",
    "WindowCache",
    "build_expert",
    "cost_vector",
    "elu_feature_map",
    "expert_flops",
    "expert_names",
    "expert_spec",
    "naive_full",
    "naive_linear",
    "naive_local",
    "projection_flops_per_token",
    "register_expert",
    "unregister_expert",
]
