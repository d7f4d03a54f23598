"""Synthetic oracle tasks: every target token comes with the attention mechanism it needs.

Each task draws token sequences in which some targets can only be predicted by one kind of
attention, and labels every target position with that mechanism, so that a router's choices
can be scored against an oracle. Label ids index :data:`ORACLE_LABELS` (the expert names
``"full"``, ``"linear"``, ``"local"``); :data:`ANY_LABEL` (-1) marks targets that need nothing
special (random fillers, fresh random symbols, markers at predictable places).

Tasks (``w`` is the local window, ``d`` the copy distance, ``2 <= d <= w``):

``recall``
    ``num_pairs`` key/value pairs open the sequence, uniform random fillers follow, and
    ``num_queries`` triplets ``QUERY key value`` close it, asking distinct keys in random order
    (``query_order="random"``) or in the order they were stored (``"stored"``). The value after
    a queried key is determined only by the pair stored more than ``w`` tokens back (at least
    :attr:`SyntheticConfig.min_recall_distance`): label ``"full"``.
``copy``
    Segments ``s_1 .. s_{d-1} COPY s_1 .. s_{d-1}`` repeat, at a random phase. Every token after
    ``COPY`` repeats the token exactly ``d`` positions back, inside the window: label ``"local"``.
``drift``
    Tokens of a small background alphabet of ``M`` symbols, drawn from a distribution
    ``p_m ∝ exp(kappa * cos(2 pi m / M - theta_t))`` whose centre ``theta_t`` drifts slowly and
    linearly across the sequence. No single past token matters, but the current centre is
    estimated by pooling all of the history, which a running sum (linear attention) does at O(1)
    state: label ``"linear"``.
``mixed``
    All three in every sequence: drifting background tokens (``"linear"``), key/value pairs at
    the start and queries at the end (``"full"``), and ``num_copy_segments`` copy segments at
    random places in between (``"local"``).

Every generator is vectorised over sequences and positions (Python loops only over the
handful of copy segments) and driven by a seeded :class:`torch.Generator`.

**Presets.** :data:`PRESETS` names tuned configurations; ``"synthetic:<preset>"`` loads one
through :func:`~bayes_router.data.corpus.load_corpus` (see :func:`preset_config`).

``recall-far``
    A ``recall`` task that all-``full`` attention can solve and local attention cannot reach:
    4 pairs over 10 keys and 10 values (``vocab_size=40``), all 4 queried in the order they were
    stored (``query_order="stored"``), 16384 training sequences (so the answers cannot be
    memorised), 512 per evaluation split. Defaults ``seq_len=32``, ``window=4``. The run's
    ``seq_len`` and ``window`` are accepted as given, but every recall target must lie more
    than ``2 * window`` tokens after its source (two stacked local layers see ``2 w`` back),
    that is ``seq_len >= 2 * window + 12``; otherwise :func:`preset_config` raises a
    ``ValueError`` naming the ``seq_len`` needed. The label ``"full"`` here means "out of the
    local window's reach": with stored order each answer is a fixed-offset lookup, which linear
    attention can also express once the output head is untied. ``docs/phase1.md`` gives the
    measurements behind these settings and the ``make demo`` results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ANY_LABEL",
    "ORACLE_LABELS",
    "ORACLE_LABEL_IDS",
    "PRESETS",
    "QUERY_ORDERS",
    "SYNTHETIC_TASKS",
    "SPLITS",
    "SyntheticConfig",
    "SyntheticCorpus",
    "SyntheticTask",
    "TokenLayout",
    "background_probabilities",
    "generate_task",
    "preset_config",
    "synthetic_corpus",
    "token_layout",
]

ORACLE_LABELS = ("full", "linear", "local")
ANY_LABEL = -1
ORACLE_LABEL_IDS = {**{name: i for i, name in enumerate(ORACLE_LABELS)}, "any": ANY_LABEL}
SYNTHETIC_TASKS = ("recall", "copy", "drift", "mixed")
SPLITS = ("train", "val", "test")
QUERY_ORDERS = ("random", "stored")

_FULL, _LINEAR, _LOCAL = (ORACLE_LABEL_IDS[name] for name in ORACLE_LABELS)


@dataclass(frozen=True)
class TokenLayout:
    """Which token ids play which role; the same for every task at a given vocabulary size.

    Ids 0 and 1 are the ``QUERY`` and ``COPY`` markers, then come ``background_size``
    background symbols, and the rest is split evenly into keys, values and copy content.
    """

    vocab_size: int
    query: int
    copy: int
    background: range
    keys: range
    values: range
    content: range


def token_layout(vocab_size: int, background_size: int = 8) -> TokenLayout:
    """The :class:`TokenLayout` of a vocabulary of ``vocab_size`` ids.

    :raises ValueError: if ``background_size < 2`` or ``vocab_size`` leaves fewer than two ids
        for each of keys, values and content.
    """
    if not isinstance(background_size, int) or background_size < 2:
        raise ValueError(f"background_size must be an integer >= 2, got {background_size!r}")
    minimum = 2 + background_size + 6
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be an integer >= {minimum} (2 markers, {background_size} "
            f"background ids, 2 each for keys, values, content), got {vocab_size!r}"
        )
    start = 2 + background_size
    third = (vocab_size - start) // 3
    return TokenLayout(
        vocab_size=vocab_size,
        query=0,
        copy=1,
        background=range(2, start),
        keys=range(start, start + third),
        values=range(start + third, start + 2 * third),
        content=range(start + 2 * third, vocab_size),
    )


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines a synthetic task; stored whole in results files.

    :param task: one of :data:`SYNTHETIC_TASKS`.
    :param num_sequences: sequences in the train split.
    :param num_eval_sequences: sequences in each of the val and test splits.
    :param seq_len: length ``T`` of the inputs ``x`` (and targets ``y``).
    :param vocab_size: number of token ids (see :func:`token_layout`).
    :param window: look-back ``w`` of the local expert the task is built for.
    :param num_pairs: key/value pairs stored at the start (``recall``, ``mixed``).
    :param num_queries: queried keys at the end, distinct, ``<= num_pairs``.
    :param copy_distance: distance ``d`` between a copied token and its source,
        ``2 <= d <= window``; ``None`` means ``max(2, window // 2)``.
    :param num_copy_segments: copy segments in each ``mixed`` sequence.
    :param query_order: order of the queried keys, one of :data:`QUERY_ORDERS`: ``"random"``
        or ``"stored"`` (the order of their pairs).
    :param background_size: size ``M`` of the background alphabet.
    :param concentration: ``kappa`` of the background distribution (0 gives uniform tokens).
    :param max_drift: largest total rotation (radians) of the background centre over a sequence.
    :param seed: seed of the generators (each split derives its own from it).
    """

    task: str = "mixed"
    num_sequences: int = 1024
    num_eval_sequences: int = 128
    seq_len: int = 256
    vocab_size: int = 64
    window: int = 32
    num_pairs: int = 4
    num_queries: int = 4
    copy_distance: int | None = None
    num_copy_segments: int = 2
    query_order: str = "random"
    background_size: int = 8
    concentration: float = 2.0
    max_drift: float = math.pi
    seed: int = 0

    def __post_init__(self):
        if self.task not in SYNTHETIC_TASKS:
            raise ValueError(f"task must be one of {SYNTHETIC_TASKS}, got {self.task!r}")
        for name in ("num_sequences", "num_eval_sequences", "seq_len", "window", "num_pairs",
                     "num_queries", "num_copy_segments"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.query_order not in QUERY_ORDERS:
            raise ValueError(f"query_order must be one of {QUERY_ORDERS}, got "
                             f"{self.query_order!r}")
        if self.copy_distance is None:
            object.__setattr__(self, "copy_distance", max(2, self.window // 2))
        if not isinstance(self.copy_distance, int) or not 2 <= self.copy_distance <= self.window:
            raise ValueError(
                f"copy_distance must be an integer in [2, window={self.window}], "
                f"got {self.copy_distance!r}"
            )
        for name in ("concentration", "max_drift"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        layout = self.layout
        if self.num_pairs > len(layout.keys):
            raise ValueError(
                f"num_pairs must be <= {len(layout.keys)} (the number of key ids at "
                f"vocab_size={self.vocab_size}), got {self.num_pairs}"
            )
        if self.num_queries > self.num_pairs:
            raise ValueError(
                f"num_queries must be <= num_pairs={self.num_pairs}, got {self.num_queries}"
            )
        needed = self.min_seq_len
        if self.seq_len < needed:
            raise ValueError(f"seq_len must be >= {needed} for task {self.task!r} with these "
                             f"settings, got {self.seq_len}")

    @property
    def layout(self) -> TokenLayout:
        """The :class:`TokenLayout` of this task's vocabulary."""
        return token_layout(self.vocab_size, self.background_size)

    @property
    def segment_len(self) -> int:
        """Length ``2d - 1`` of one copy segment."""
        return 2 * self.copy_distance - 1

    @property
    def min_seq_len(self) -> int:
        """Shortest ``seq_len`` at which the task can be laid out."""
        ends = 2 * self.num_pairs + 3 * self.num_queries
        if self.task == "recall":  # the gap between pairs and queries must exceed the window
            return ends + self.window - 1
        if self.task == "copy":  # at least one whole segment whatever the phase
            return 2 * self.segment_len - 1
        if self.task == "mixed":
            return ends + max(self.window, self.num_copy_segments * self.segment_len) - 1
        return 1

    @property
    def min_recall_distance(self) -> int:
        """Smallest distance ``t - s`` from a recall target's source ``s`` to its position ``t``.

        Query ``j`` (0-based) is answered at ``t = L - 3 q + 3 j + 2`` (``L = seq_len``, ``q``
        queries) and copies the value of pair ``a`` at ``s = 2 a + 1``; ``a`` can be any of the
        ``p`` pairs in random order, and at most ``p - q + j`` in stored order.
        """
        first = self.seq_len + 1 - 3 * self.num_queries
        if self.query_order == "stored":
            return first - 2 * (self.num_pairs - self.num_queries)
        return first - 2 * (self.num_pairs - 1)

    def to_dict(self) -> dict:
        """The fields as a JSON-serialisable dict (``copy_distance`` resolved)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SyntheticConfig:
        """Rebuild a config written by :meth:`to_dict`.

        :raises ValueError: for unknown fields or invalid values.
        """
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"SyntheticConfig: unknown fields {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True, eq=False)
class SyntheticTask:
    """One split of a synthetic task.

    :ivar x: inputs ``(N, T)``.
    :ivar y: next-token targets ``(N, T)``, ``y[:, t] = x[:, t + 1]`` within a sequence.
    :ivar oracle: label id ``(N, T)`` of the mechanism that target ``y[:, t]`` needs, an index
        into :data:`ORACLE_LABELS` or :data:`ANY_LABEL`.
    :ivar source: ``(N, T)`` position ``s`` in ``x`` with ``y[:, t] == x[:, s]`` for targets that
        copy an earlier token (labels ``"full"`` and ``"local"``), -1 elsewhere.
    :ivar background_angle: ``(N, T)`` centre ``theta`` of the background distribution that drew
        ``y[:, t]`` (see :func:`background_probabilities`), NaN where it was not drawn from it.
    """

    name: str
    split: str
    x: Tensor
    y: Tensor
    oracle: Tensor
    source: Tensor
    background_angle: Tensor
    vocab_size: int
    layout: TokenLayout
    config: SyntheticConfig

    @property
    def num_tokens(self) -> int:
        """Number of target tokens, ``N * T``."""
        return self.y.numel()

    def label_shares(self) -> dict[str, float]:
        """Fraction of target positions carrying each oracle label (and ``"any"``)."""
        return {name: float((self.oracle == i).float().mean()) for name, i in
                ORACLE_LABEL_IDS.items()}


@dataclass(frozen=True, eq=False)
class SyntheticCorpus:
    """Train, val and test splits of one synthetic task, each drawn with its own seed."""

    name: str
    config: SyntheticConfig
    train: SyntheticTask
    val: SyntheticTask
    test: SyntheticTask

    def split(self, name: str) -> SyntheticTask:
        """The split ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


def background_probabilities(angle: Tensor, background_size: int, concentration: float) -> Tensor:
    """Background distribution ``p_m ∝ exp(kappa cos(2 pi m / M - theta))`` for each angle.

    :param angle: centres ``theta`` of any shape ``S``.
    :returns: probabilities of shape ``S + (M,)`` over the background symbols ``0 .. M-1``.
    """
    grid = 2 * math.pi * torch.arange(background_size, dtype=angle.dtype) / background_size
    return torch.softmax(concentration * torch.cos(grid - angle.unsqueeze(-1)), dim=-1)


def _split_seed(seed: int, split: str) -> int:
    digest = hashlib.sha256(f"bayes-router-synthetic:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _draw_background(config: SyntheticConfig, n: int, length: int, g: torch.Generator):
    """Drifting background tokens and their centres, both ``(n, length)``."""
    start = 2 * math.pi * torch.rand(n, 1, generator=g)
    drift = config.max_drift * (2 * torch.rand(n, 1, generator=g) - 1)
    angle = start + drift * torch.linspace(0, 1, length)  # (n, length)
    probs = background_probabilities(angle, config.background_size, config.concentration)
    u = torch.rand(n, length, 1, generator=g)
    symbol = (probs.cumsum(-1) < u).sum(-1).clamp_(max=config.background_size - 1)  # inverse CDF
    return config.layout.background.start + symbol, angle


def _place_recall(stream, label, source, config, g):
    """Write pairs at the start and ``QUERY key value`` triplets at the end, in place."""
    n, length = stream.shape
    layout, pairs, queries = config.layout, config.num_pairs, config.num_queries
    keys = layout.keys.start + torch.rand(n, len(layout.keys), generator=g).argsort(1)[:, :pairs]
    values = layout.values.start + torch.randint(len(layout.values), (n, pairs), generator=g)
    stream[:, 0:2 * pairs:2], stream[:, 1:2 * pairs:2] = keys, values
    label[:, :2 * pairs] = ANY_LABEL
    asked = torch.rand(n, pairs, generator=g).argsort(1)[:, :queries]  # distinct pair indices
    if config.query_order == "stored":
        asked = asked.sort(1).values
    first = length - 3 * queries
    stream[:, first::3] = layout.query
    stream[:, first + 1::3] = keys.gather(1, asked)
    stream[:, first + 2::3] = values.gather(1, asked)
    label[:, first:] = ANY_LABEL
    label[:, first + 2::3] = _FULL
    source[:, first + 2::3] = 2 * asked + 1  # the stored value's position


def _periodic_copy(config: SyntheticConfig, n: int, length: int, g: torch.Generator):
    """Back-to-back copy segments at a random phase: tokens, labels, sources ``(n, length)``."""
    layout, d, period = config.layout, config.copy_distance, config.segment_len
    phase = torch.randint(period, (n, 1), generator=g)
    virtual = phase + torch.arange(length)  # (n, length) position in the endless segment stream
    offset = virtual % period
    fresh = layout.content.start + torch.randint(len(layout.content), (n, length + period),
                                                 generator=g)
    copied = offset >= d
    stream = fresh.gather(1, torch.where(copied, virtual - d, virtual))
    stream = torch.where(offset == d - 1, layout.copy, stream)
    position = torch.arange(length).expand(n, length)
    is_local = copied & (position >= d)
    label = torch.where(is_local, _LOCAL, ANY_LABEL)
    source = torch.where(is_local, position - d, -1)
    return stream, label, source


def _place_copy_segments(stream, label, source, config, g):
    """Write ``num_copy_segments`` segments between the pairs and the queries, in place."""
    n, _ = stream.shape
    layout, d, seg = config.layout, config.copy_distance, config.segment_len
    lo = 2 * config.num_pairs
    slot = (stream.shape[1] - 3 * config.num_queries - lo) // config.num_copy_segments
    for i in range(config.num_copy_segments):
        start = lo + i * slot + torch.randint(slot - seg + 1, (n, 1), generator=g)
        where = start + torch.arange(seg)  # (n, 2d - 1)
        fresh = layout.content.start + torch.randint(len(layout.content), (n, d - 1), generator=g)
        marker = torch.full((n, 1), layout.copy)
        stream.scatter_(1, where, torch.cat([fresh, marker, fresh], dim=1))
        label.scatter_(1, where, torch.cat([torch.full((n, d), ANY_LABEL),
                                            torch.full((n, d - 1), _LOCAL)], dim=1))
        source.scatter_(1, where[:, d:], where[:, :d - 1])


def generate_task(config: SyntheticConfig, split: str = "train") -> SyntheticTask:
    """Draw one split of the task that ``config`` describes.

    The split's generator is seeded from ``(config.seed, split)``, so every split is
    reproducible on its own and the splits are independent draws.

    :param config: the task and its sizes.
    :param split: ``"train"`` (``num_sequences`` sequences), ``"val"`` or ``"test"``
        (``num_eval_sequences`` each).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = config.num_sequences if split == "train" else config.num_eval_sequences
    length = config.seq_len + 1  # x = stream[:, :-1], y = stream[:, 1:]
    g = torch.Generator().manual_seed(_split_seed(config.seed, split))
    layout = config.layout
    # Per stream position p: the label and source of predicting stream[:, p] from its prefix.
    label = torch.full((n, length), ANY_LABEL, dtype=torch.long)
    source = torch.full((n, length), -1, dtype=torch.long)
    angle = torch.full((n, length), math.nan)
    if config.task == "copy":
        stream, label, source = _periodic_copy(config, n, length, g)
    elif config.task == "recall":
        stream = layout.background.start + torch.randint(len(layout.background), (n, length),
                                                         generator=g)
        _place_recall(stream, label, source, config, g)
    else:
        stream, angle = _draw_background(config, n, length, g)
        label.fill_(_LINEAR)
        if config.task == "mixed":
            _place_copy_segments(stream, label, source, config, g)
            _place_recall(stream, label, source, config, g)
            angle = torch.where(label == _LINEAR, angle, math.nan)
    return SyntheticTask(
        name=config.task,
        split=split,
        x=stream[:, :-1].contiguous(),
        y=stream[:, 1:].contiguous(),
        oracle=label[:, 1:].contiguous(),
        source=source[:, 1:].contiguous(),
        background_angle=angle[:, 1:].contiguous(),
        vocab_size=config.vocab_size,
        layout=layout,
        config=config,
    )


def synthetic_corpus(config: SyntheticConfig, name: str | None = None) -> SyntheticCorpus:
    """Train, val and test splits of ``config``'s task (see :func:`generate_task`).

    :param name: the corpus name; default ``"synthetic:<task>"``.
    """
    splits = {split: generate_task(config, split) for split in SPLITS}
    return SyntheticCorpus(name=name or f"synthetic:{config.task}", config=config, **splits)


#: Named configurations (see the module docstring): ``fields`` are :class:`SyntheticConfig`
#: values that callers may override, ``min_distance_windows`` the multiple of the window that
#: every recall target must lie beyond its source.
PRESETS = {
    "recall-far": {
        "fields": {"task": "recall", "seq_len": 32, "window": 4, "vocab_size": 40,
                   "num_pairs": 4, "num_queries": 4, "query_order": "stored",
                   "num_sequences": 16384, "num_eval_sequences": 512},
        "min_distance_windows": 2,
    },
}


def preset_config(name: str, **overrides) -> SyntheticConfig:
    """The :class:`SyntheticConfig` of preset ``name`` with ``overrides`` (``seq_len``,
    ``window``, ``seed``, ...) applied.

    :raises ValueError: for an unknown preset, an override of ``task``, or a ``seq_len`` and
        ``window`` that bring a recall target within ``min_distance_windows * window`` tokens of
        its source.
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    if "task" in overrides:
        raise ValueError(f"task: preset {name!r} fixes task={PRESETS[name]['fields']['task']!r}; "
                         "do not override it")
    preset = PRESETS[name]
    config = SyntheticConfig(**{**preset["fields"], **overrides})
    reach = preset["min_distance_windows"] * config.window
    if config.task in ("recall", "mixed") and config.min_recall_distance <= reach:
        needed = config.seq_len + reach + 1 - config.min_recall_distance
        widest = math.ceil(config.min_recall_distance / preset["min_distance_windows"])
        raise ValueError(
            f"seq_len/window: preset {name!r} needs every recall target more than "
            f"{preset['min_distance_windows']} * window = {reach} tokens after its source, but "
            f"seq_len={config.seq_len} gives {config.min_recall_distance}; use seq_len >= "
            f"{needed} or a window < {widest}"
        )
    return config
