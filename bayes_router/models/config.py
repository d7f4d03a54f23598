"""One dataclass configures the routed language model; every submodule receives it whole."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bayes_router.core.options import option
from bayes_router.core.validation import check_int
from bayes_router.models.experts import expert_names

COST_PRESETS = ("flops", "seed")
#: Position schemes: absolute learned embeddings, or rotary embeddings of q and k.
POSITIONS = ("learned", "rotary")

#: The Phase-1 size: small enough to train six runs in minutes on 2 CPU cores. The command line's
#: model defaults (``TinyLMConfig.phase1(vocab_size)`` builds it in Python).
PHASE1_SIZE = {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 128, "window": 16,
               "chunk_size": 32, "cost_preset": "seed"}


@dataclass(frozen=True)
class TinyLMConfig:
    """Configuration of :class:`~bayes_router.models.tinylm.TinyLM` and its routed layers.

    :param vocab_size: number of token ids.
    :param d_model: width ``D`` of the residual stream.
    :param n_heads: attention heads ``H``; must divide ``d_model``.
    :param n_layers: number of transformer blocks ``L``.
    :param max_seq_len: longest sequence; fixes the position feature ``t / (max_seq_len - 1)``.
    :param experts: names of the attention experts of every layer (see the expert registry).
    :param window: look-back ``w`` of the ``local`` expert (it sees ``[t - w, t]``).
    :param chunk_size: chunk length of the ``linear`` expert's chunked prefix sums.
    :param shared_qkv: if true (default) the experts of a layer share one q/k/v/out projection
        and differ only in how they mix; otherwise every expert owns its projections.
    :param causal: causal (language-model) attention; ``False`` gives the bidirectional form.
    :param mlp_ratio: hidden width of the feed-forward block relative to ``d_model``.
    :param controller_hidden: hidden width of the routing controller's MLP.
    :param tie_weights: tie the output head to the token embedding.
    :param cost_preset: ``"flops"`` (costs from the FLOP model at ``max_seq_len``) or ``"seed"``
        (the paper prototype's fixed ``[1.0, 0.15, 0.30]``).
    :param cost_includes_projections: count the q/k/v/out projections in the cost vector.
    :param positions: ``"learned"``: absolute position embeddings, a table of ``max_seq_len``
        rows that caps every context at ``max_seq_len``, and the controller's position feature
        ``t / (max_seq_len - 1)``; ``"rotary"``: rotary embeddings of every head's q and k
        (:mod:`~bayes_router.models.rotary`), no cap, and the feature ``log(1 + t) / log(
        max_seq_len)``, 1 at the training length and slowly growing past it (a linear one
        would leave the range the controller was trained on at once).
    :param dense_hard_max_len: hard-routed sequences up to this length run every token through
        one dense attention matrix, each row by its own expert
        (:mod:`~bayes_router.models.dense_mix`), instead of the sparse per-expert paths, whose
        bookkeeping costs more than they save on short sequences; ``0``: always sparse. Needs
        ``shared_qkv`` and experts with a dense form. The default is the measured crossover
        (``docs/experts.md``).
    """

    vocab_size: int = option(128, "token ids: set from the corpus", command_line=False)
    d_model: int = option(128, "residual width D")
    n_heads: int = option(4, "attention heads H")
    n_layers: int = option(2, "transformer blocks L")
    max_seq_len: int = option(
        256, "longest training sequence (fixes the position feature); with learned positions "
        "also the longest context the model can decode")
    experts: tuple[str, ...] = option(
        ("full", "linear", "local"), "comma-separated expert names (see the expert registry)")
    window: int = option(32, "local expert's look-back w")
    chunk_size: int = option(64, "linear expert's chunk length")
    shared_qkv: bool = option(
        True, "one q/k/v/out projection per expert (default: shared)", flag="--separate-qkv",
        negate=True)
    causal: bool = option(
        True, "bidirectional attention is for tests of the experts: a language model is causal",
        command_line=False)
    mlp_ratio: int = option(4, "feed-forward hidden width over d_model")
    controller_hidden: int = option(64, "hidden width of the routing controller's MLP")
    tie_weights: bool = option(
        True, "an output head of its own (default: tied to the token embedding)",
        flag="--untie-head", negate=True)
    cost_preset: str = option(
        "flops", "seed: the paper's fixed [1.0, 0.15, 0.30]; flops: from the FLOP model",
        choices=COST_PRESETS)
    cost_includes_projections: bool = option(
        False, "count the q/k/v/out projections in the FLOP model's cost vector")
    dense_hard_max_len: int = option(
        256, "hard-routed sequences up to this length run every token through every expert "
        "and select (0: always the sparse per-expert paths)")
    positions: str = option(
        "learned", "learned: absolute position embeddings up to --max-seq-len; rotary: rotary "
        "embeddings of q and k (decodes past --max-seq-len)", choices=POSITIONS)

    @classmethod
    def phase1(cls, vocab_size: int = 128, **overrides) -> TinyLMConfig:
        """The :data:`PHASE1_SIZE` model (the command line's defaults), with ``overrides``."""
        return cls(**{**PHASE1_SIZE, "vocab_size": vocab_size, **overrides})

    def __post_init__(self):
        if isinstance(self.experts, str) or not hasattr(self.experts, "__iter__"):
            raise ValueError(f"experts must be a sequence of expert names, got "
                             f"{self.experts!r}")
        object.__setattr__(self, "experts", tuple(self.experts))
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "mlp_ratio",
                     "controller_hidden", "chunk_size", "max_seq_len", "window"):
            check_int(name, getattr(self, name), least=2 if name == "max_seq_len" else 1)
        if isinstance(self.dense_hard_max_len, bool) or not isinstance(
                self.dense_hard_max_len, int) or self.dense_hard_max_len < 0:
            raise ValueError(f"dense_hard_max_len must be an integer >= 0 (0: always sparse), "
                             f"got {self.dense_hard_max_len!r}")
        for name in ("shared_qkv", "causal", "tie_weights", "cost_includes_projections"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.window >= self.max_seq_len:
            raise ValueError(
                f"window must be < max_seq_len (a look-back of max_seq_len - 1 already sees "
                f"every position; a longer one only costs time and memory), got "
                f"window={self.window}, max_seq_len={self.max_seq_len}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads must divide d_model, got n_heads={self.n_heads}, d_model={self.d_model}"
            )
        if not self.experts:
            raise ValueError("experts must name at least one expert")
        if not all(isinstance(e, str) and e.strip() for e in self.experts):
            raise ValueError(f"experts must be non-empty names (registered experts are "
                             f"{expert_names()}), got {self.experts}")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"experts must not repeat a name, got {self.experts}")

        unknown = [e for e in self.experts if e not in expert_names()]
        if unknown:
            raise ValueError(f"experts: unknown {unknown}; registered experts are {expert_names()}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {list(POSITIONS)}, got "
                             f"{self.positions!r}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"positions='rotary' needs an even head dimension d_model / "
                             f"n_heads, got {self.d_model} / {self.n_heads} = {self.head_dim}")
        if self.cost_preset not in COST_PRESETS:
            raise ValueError(
                f"cost_preset must be one of {sorted(COST_PRESETS)}, got {self.cost_preset!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def max_context(self) -> int | None:
        """The longest sequence the model can read: ``max_seq_len`` with learned positions,
        ``None`` (no cap) with rotary ones."""
        return self.max_seq_len if self.positions == "learned" else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TinyLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"TinyLMConfig: unknown fields {sorted(unknown)}")
        return cls(**data)


