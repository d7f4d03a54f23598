"""The expert registry: names to classes (and optional fixed costs)."""

from __future__ import annotations

from dataclasses import dataclass

from bayes_router.models.experts.base import AttentionExpert
from bayes_router.models.experts.full import FullAttention
from bayes_router.models.experts.linear import LinearAttention
from bayes_router.models.experts.local import LocalAttention


@dataclass(frozen=True)
class ExpertSpec:
    """A registered expert: its class and, optionally, a fixed relative cost."""

    name: str
    cls: type[AttentionExpert]
    fixed_cost: float | None = None


_REGISTRY: dict[str, ExpertSpec] = {}


def register_expert(name: str, cls: type[AttentionExpert], fixed_cost: float | None = None,
                    overwrite: bool = False) -> None:
    """Register an expert class under ``name``.

    The class must subclass :class:`AttentionExpert` and implement
    ``forward(q, k, v, positions)`` and ``flops_per_token(seq_len, d_model, n_heads)``, or give
    ``fixed_cost`` (relative to ``full = 1``), which the cost vector uses as is. It is built by
    its :meth:`~AttentionExpert.from_config` (by default ``cls(causal=cfg.causal)``).
    """
    if not isinstance(cls, type) or not issubclass(cls, AttentionExpert):
        raise TypeError(f"cls must subclass AttentionExpert, got {cls!r}")
    if fixed_cost is not None and not fixed_cost > 0:
        raise ValueError(f"fixed_cost must be > 0, got {fixed_cost}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"expert {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = ExpertSpec(name, cls, fixed_cost)


def unregister_expert(name: str) -> None:
    _REGISTRY.pop(name, None)


def expert_names() -> list[str]:
    return list(_REGISTRY)


def expert_spec(name: str) -> ExpertSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown expert {name!r}; registered experts are {expert_names()}")
    return _REGISTRY[name]


def build_expert(name: str, cfg) -> AttentionExpert:
    """Build the expert ``name`` from a :class:`~bayes_router.models.config.TinyLMConfig`."""
    return expert_spec(name).cls.from_config(cfg)


register_expert("full", FullAttention)
register_expert("linear", LinearAttention)
register_expert("local", LocalAttention)
