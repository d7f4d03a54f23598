"""The expert contract and the row helpers every sparse (hard-routed) kernel shares.

An expert *mixes* projected heads: ``expert(q, k, v) -> o`` with ``q, k, v`` of shape
``(B, H, T, d)``. Given ``positions`` of shape ``(B, R)`` it computes outputs only for those query
rows (keys and values stay whole) and returns ``(B, H, R, d)``: this is how hard routing saves real
compute. The q/k/v/out projections live in :class:`~bayes_router.models.router.RoutedAttention`.

**Decoding.** An expert also keeps an incremental *state* of the keys and values it has seen
(:class:`ExpertState`; a :class:`KVCache` by default), so that a sequence can be continued
token by token: :meth:`AttentionExpert.write_state` appends the keys and values of a prefill
(the layer's one pass over the prompt), :meth:`AttentionExpert.decode` appends new tokens and
returns the outputs of their queries, reading only what the expert needs. Every expert's state
takes every token (a later query may route anywhere); only the queries routed to an expert
read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from bayes_router.core.validation import all_finite, is_validation_enabled

ROW_TILE = 128  # query rows per tile when computing gathered rows (bounds memory and waste)


def common_value(lengths: Tensor) -> int | None:
    """The one value of ``lengths (B,)``, or ``None`` where they differ (one synchronisation:
    a decoding step then needs none)."""
    first = int(lengths[0]) if lengths.numel() else 0
    return first if bool((lengths == first).all()) else None


@dataclass
class ExpertState:
    """What one expert of one layer keeps of the sequences it has read, for decoding.

    :param lengths: ``(B,)`` int64, the tokens written per sequence so far (sequences of one
        batch may differ: prompts of different lengths). Move it with :meth:`advance` or
        :meth:`set_lengths`, which also keep the common length that spares a decoding step
        its device synchronisations.
    """

    lengths: Tensor

    def __post_init__(self):
        self.set_lengths(self.lengths)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors, all sequences together."""
        return sum(getattr(self, f.name).nbytes for f in fields(self)
                   if isinstance(getattr(self, f.name), Tensor))

    def set_lengths(self, lengths: Tensor) -> None:
        """Set every sequence's length (a benchmark rewinds a state this way)."""
        self.lengths, self._common = lengths, common_value(lengths)

    def advance(self, count: int, counts: Tensor | None = None) -> None:
        """``count`` more tokens in every sequence, or ``counts (B,)`` each."""
        if counts is None:
            self.lengths = self.lengths + count
            if self._common is not None:
                self._common += count
        else:
            self.set_lengths(self.lengths + counts)

    def positions(self, count: int) -> Tensor:
        """``(B, count)`` positions of the next ``count`` tokens of every sequence."""
        return self.lengths[:, None] + torch.arange(count, device=self.lengths.device)

    def common_length(self) -> int | None:
        """The one length of every sequence, or ``None`` if they differ (no synchronisation:
        kept by :meth:`advance` and :meth:`set_lengths`)."""
        return self._common


def valid_counts(lengths: Tensor | None, batch: int, count: int, device) -> Tensor | None:
    """``(B,)`` int64: how many of ``count`` new tokens of each sequence are real (the rest
    right padding of a shorter prompt); ``None`` (all of them) by default."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=device).long()
    if lengths.shape != (batch,) or bool((lengths < 0).any()) or bool((lengths > count).any()):
        raise ValueError(f"lengths must hold one count in [0, {count}] per sequence "
                         f"(B={batch}), got {lengths.tolist()}")
    return lengths


@dataclass
class KVCache(ExpertState):
    """The keys and values of every token written: ``(B, H, capacity, d)`` each, the first
    ``lengths[b]`` positions of sequence ``b`` filled. The state of ``full`` and the default of
    any expert without a smaller one."""

    keys: Tensor
    values: Tensor

    @classmethod
    def empty(cls, k: Tensor, capacity: int) -> KVCache:
        B, H, _, d = k.shape
        return cls(torch.zeros(B, dtype=torch.long, device=k.device),
                   k.new_empty(B, H, capacity, d), k.new_empty(B, H, capacity, d))

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def write(self, k: Tensor, v: Tensor, counts: Tensor | None = None) -> None:
        """Append ``k, v (B, H, T, d)``, of which the first ``counts[b]`` of sequence ``b`` are
        real (all by default): all ``T`` are stored (the padding past a count is overwritten
        by the next write, and no read reaches it)."""
        B, _, T, _ = k.shape
        start = self.common_length()
        end = start + T if start is not None else int((self.lengths + T).max())
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; writing {T} more "
                             f"after {end - T} needs {end}")
        if start is not None:  # one length: a slice
            self.keys[:, :, start:start + T] = k
            self.values[:, :, start:start + T] = v
        else:  # (B, T) positions, written through the (B, capacity, H, d) view
            batch = torch.arange(B, device=k.device)[:, None]
            where = self.positions(T)
            self.keys.transpose(1, 2)[batch, where] = k.transpose(1, 2)
            self.values.transpose(1, 2)[batch, where] = v.transpose(1, 2)
        self.advance(T, counts)


def causal_valid(seq_len: int, causal: bool, device=None) -> Tensor:
    """``(T, T)``: every key (bidirectional) or the keys at or before the query (causal)."""
    valid = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    return valid.tril_() if causal else valid


class AttentionExpert(nn.Module):
    """Base class: a parameter-free mixer ``(q, k, v[, positions]) -> o``.

    Subclasses set :attr:`name` and implement :meth:`forward`, :meth:`flops_per_token` and
    :meth:`naive` (the obviously correct reference the tests compare against). An expert that
    needs settings of the model configuration besides ``causal`` overrides :meth:`from_config`;
    its constructor takes only what it uses.
    """

    name: str = ""

    def __init__(self, causal: bool = True):
        super().__init__()
        self.causal = bool(causal)
        self.register_forward_pre_hook(_check_call, with_kwargs=True)

    @classmethod
    def from_config(cls, cfg) -> AttentionExpert:
        """The expert of a :class:`~bayes_router.models.config.TinyLMConfig`."""
        return cls(causal=cfg.causal)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def flops_per_token(self, seq_len: int, d_model: int, n_heads: int) -> float:
        """*Useful* FLOPs per query token, averaged over the ``seq_len`` positions: what the
        mixing needs at the least (the keys a query really attends, a linear state's update and
        readout), whatever the kernel does. The cost vector of the prior uses these, for every
        expert alike (multiply-add = 2 FLOPs; projections excluded)."""
        raise NotImplementedError

    def executed_flops_per_token(self, seq_len: int, d_model: int, n_heads: int,
                                 batch: int = 1) -> float:
        """FLOPs per query token the kernel actually runs (masked-out work included) on a
        batch of ``batch`` sequences (a kernel's choice of path may depend on it), reported
        beside the useful ones; by default the same."""
        return self.flops_per_token(seq_len, d_model, n_heads)

    def decode_flops(self, context: int, d_model: int, n_heads: int) -> dict[str, float]:
        """Useful FLOPs of one decoding step of one token at ``context`` cached tokens:
        ``read``, what its query costs where it is routed here (it sees the ``context + 1``
        keys up to itself, by default), and ``write``, what its key and value cost to append
        (paid by every token, routed here or not). Multiply-add = 2 FLOPs."""
        return {"read": 4.0 * d_model * (context + 1), "write": 0.0}

    def naive(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The same mixing by a dense, obviously correct computation (all rows)."""
        raise NotImplementedError

    # -- decoding -------------------------------------------------------------------------------

    def write_state(self, state: ExpertState | None, k: Tensor, v: Tensor,
                    lengths: Tensor | None = None, capacity: int | None = None) -> ExpertState:
        """Append the keys and values ``k, v (B, H, T, d)`` of every sequence to ``state``
        (``None``: a new state, room for ``capacity`` positions where it stores them) and
        return it. ``lengths (B,)``: how many of the ``T`` are real per sequence (prompts of
        different lengths, right-padded); all by default. Causal experts only."""
        counts = valid_counts(lengths, k.shape[0], k.shape[2], k.device)
        self._check_decoding()
        if state is None:
            state = KVCache.empty(k, k.shape[2] if capacity is None else capacity)
        state.write(k, v, counts)
        return state

    def decode(self, state: ExpertState, q: Tensor, k: Tensor, v: Tensor,
               rows: Tensor | None = None) -> Tensor:
        """Append the next ``T`` tokens ``k, v (B, H, T, d)`` of every sequence to ``state``
        (in place) and return the outputs ``(R, H, T, d)`` of the queries ``q (R, H, T, d)``
        of the sequences ``rows (R,)`` (``None``: all ``B``). The same as the expert's
        forward pass over each whole sequence, at its last ``T`` positions. ``T > 1`` is a
        prompt continued in chunks (the local expert needs sequences of one length for it).

        By default the state is a :class:`KVCache` and every read runs :meth:`forward` over
        the whole prefix (right for any causal expert, at the cost of recomputing it)."""
        T = k.shape[2]
        self.write_state(state, k, v)
        if rows is None:
            rows = torch.arange(k.shape[0], device=k.device)
        outputs = []
        for i, row in enumerate(rows.tolist()):  # a loop over sequences, never positions
            n = int(state.lengths[row])
            keys, values = state.keys[row:row + 1, :, :n], state.values[row:row + 1, :, :n]
            queries = torch.cat([q.new_zeros(1, q.shape[1], n - T, q.shape[3]), q[i:i + 1]], 2)
            last = torch.arange(n - T, n, device=q.device)[None]
            outputs.append(self(queries, keys, values, last))
        return torch.cat(outputs) if outputs else q[:0]

    def _check_decoding(self) -> None:
        if not self.causal:
            raise ValueError(f"{self.name} expert: decoding needs causal attention "
                             f"(causal=True); a bidirectional expert reads future tokens")

    def softmax_keys(self, seq_len: int, device=None) -> Tensor | None:
        """``(T, T)`` boolean, the keys each query sees, if this expert is softmax attention
        ``softmax(q k^T / sqrt(d))`` over them; ``None`` (the default) otherwise. Experts that
        give one share a single score matrix on short hard-routed sequences
        (:mod:`~bayes_router.models.dense_mix`)."""
        return None

    def extra_repr(self) -> str:
        return f"causal={self.causal}"


def _check_call(expert: AttentionExpert, args: tuple, kwargs: dict):
    names = ("q", "k", "v", "positions")
    bound = dict(zip(names, args, strict=False)) | kwargs
    missing = [n for n in names[:3] if n not in bound]
    if missing:
        raise TypeError(f"{expert.name} expert: missing {missing}")
    check_expert_inputs(expert.name, bound["q"], bound["k"], bound["v"], bound.get("positions"))


def check_expert_inputs(name: str, q, k, v, positions=None) -> None:
    """The contract of an expert's inputs, checked at its public boundary.

    ``q, k, v``: floating tensors of one dtype and device, shape ``(B, H, T, d)`` each (the same
    ``T``: every expert mixes a sequence with itself); ``positions``: an integer ``(B, R)``
    tensor of rows in ``[0, T)``. With validation enabled
    (:mod:`bayes_router.core.validation`) the values are checked too: finite inputs, positions
    in range.

    :raises ValueError: naming the argument and what it should be.
    """
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} expert: {arg} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} expert: {arg} must be a floating tensor, got {x.dtype}")
        if x.dim() != 4:
            raise ValueError(f"{name} expert: {arg} must have shape (B, H, T, d), got "
                             f"{tuple(x.shape)}")
    if not q.dtype == k.dtype == v.dtype or not q.device == k.device == v.device:
        raise ValueError(f"{name} expert: q, k and v must share dtype and device, got "
                         f"{q.dtype}/{k.dtype}/{v.dtype} on {q.device}/{k.device}/{v.device}")
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"{name} expert: q, k and v must have one shape (B, H, T, d), got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if positions is not None:
        if not isinstance(positions, Tensor) or positions.is_floating_point() or \
                positions.dtype == torch.bool:
            raise ValueError(f"{name} expert: positions must be an integer tensor (B, R), got "
                             f"{getattr(positions, 'dtype', type(positions).__name__)}")
        if positions.dim() != 2 or positions.shape[0] != q.shape[0]:
            raise ValueError(f"{name} expert: positions must have shape (B={q.shape[0]}, R), "
                             f"got {tuple(positions.shape)}")
    if not is_validation_enabled():
        return
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if not all_finite(x):
            raise ValueError(f"{name} expert: {arg} holds NaN or Inf")
    if positions is not None and positions.numel() and (
            int(positions.min()) < 0 or int(positions.max()) >= q.shape[2]):
        raise ValueError(f"{name} expert: positions must lie in [0, T={q.shape[2]}), got "
                         f"min {int(positions.min())}, max {int(positions.max())}")


def gather_rows(x: Tensor, positions: Tensor) -> Tensor:
    """``x (B, H, T, d)``, ``positions (B, R)`` -> ``(B, H, R, d)``.

    One ``index_select`` of whole ``d``-rows of the flattened ``(B H T, d)`` view: ``Tensor.gather``
    with an index expanded over ``d`` reads an int64 index per element and is several times slower.
    """
    B, H, T, d = x.shape
    flat_index = torch.arange(B * H, device=x.device).view(B, H, 1) * T + positions[:, None, :]
    return x.reshape(B * H * T, d).index_select(0, flat_index.reshape(-1)).view(B, H, -1, d)


def row_tiles(positions: Tensor):
    """Split gathered rows into tiles of ``ROW_TILE`` (a loop over tiles, never over positions)."""
    for start in range(0, positions.shape[1], ROW_TILE):
        yield positions[:, start:start + ROW_TILE]


def block_layout(positions: Tensor, block: int, n_blocks: int, seq_len: int
                 ) -> tuple[Tensor, Tensor, int]:
    """Group ascending query rows by the block of ``block`` positions they fall in.

    Blocked kernels then run on ``(n_blocks, M)`` query slots, ``M`` the most distinct rows in
    any block, with the same batched matmuls as the dense path, instead of gathering per-row
    windows or states. Repeated positions (the padding of
    :func:`~bayes_router.models.router.selected_positions`) share one slot, so padding never
    widens the layout.

    :param positions: ``(B, R)`` non-decreasing positions (padding may repeat the last one).
    :returns: ``slot (B, R)``, each row's index in the ``n_blocks * M`` slots; ``source
        (B, n_blocks * M)``, the position each slot computes (an empty slot computes its block's
        first position: a valid query whose output is never read); and ``M``.
    """
    B, R = positions.shape
    block_of = positions // block  # (B, R), non-decreasing
    is_new = torch.ones_like(positions, dtype=torch.bool)
    is_new[:, 1:] = positions[:, 1:] != positions[:, :-1]
    distinct = is_new.long().cumsum(1) - 1  # index among the row's distinct positions
    first_of_block = torch.searchsorted(block_of, block_of)  # (B, R) first entry of its block
    rank = distinct - distinct.gather(1, first_of_block)
    M = int(rank.max()) + 1 if R else 1  # no rows: one (unread) slot per block
    slot = block_of * M + rank  # (B, R)
    source = torch.arange(n_blocks * M, device=positions.device) // M * block
    source = source.clamp(max=seq_len - 1).expand(B, -1).clone().scatter_(1, slot, positions)
    return slot, source, M


def pad_rows(x: Tensor, rows: int, front: int = 0, back: int = 0,
             scale: float | None = None) -> Tensor:
    """``x (B, H, T, d)`` as one flat block of rows ``(front + B H rows + back, d)``: each
    ``(batch, head)`` sequence (times ``scale``) in ``rows`` rows, zeros after its ``T``, the
    sequences back to back between ``front`` and ``back`` zero rows. A view of ``x`` where it
    is already that layout (contiguous, nothing to pad or scale), else one pass over ``x``
    whatever its memory format, zeros only in the padding (``F.pad`` zeroes the whole output
    first)."""
    B, H, T, d = x.shape
    if rows == T and not front and not back and scale is None and x.is_contiguous():
        return x.view(-1, d)
    body_rows = B * H * rows
    out = x.new_empty(front + body_rows + back, d)
    out[:front].zero_()
    out[front + body_rows:].zero_()
    body = out[front:front + body_rows].view(B, H, rows, d)
    body[:, :, T:].zero_()
    if scale is None:
        body[:, :, :T].copy_(x)
    elif torch.is_grad_enabled() and x.requires_grad:  # out= does not differentiate
        body[:, :, :T] = x * scale
    else:
        torch.mul(x, scale, out=body[:, :, :T])
    return out


def additive_mask(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean ``valid`` -> ``0`` where true, ``-inf`` where false."""
    mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill_(~valid, -math.inf)
