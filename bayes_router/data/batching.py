"""Batches of next-token windows from a token stream, or of whole synthetic sequences.

:func:`batches` draws random windows for training, :func:`eval_batches` walks a split once in
non-overlapping windows for evaluation, and :func:`task_batches` walks the sequences of a
synthetic task with their oracle labels. In every batch ``y`` is ``x`` shifted by one token:
``y[b, t]`` is the token that follows ``x[b, t]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from bayes_router.data.synthetic import SyntheticTask

__all__ = ["batches", "eval_batches", "sample_sequences", "sample_windows", "sequence_batches",
           "task_batches"]


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_tokens(tokens: Tensor, seq_len: int) -> None:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must hold integer ids, got dtype {tokens.dtype}")
    if tokens.numel() < seq_len + 1:
        raise ValueError(
            f"tokens must hold at least seq_len + 1 = {seq_len + 1} ids for one window, "
            f"got {tokens.numel()}"
        )


def sample_windows(tokens: Tensor, batch_size: int, seq_len: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One batch of random training windows ``(x, y)``, each ``(batch_size, seq_len)``: every
    window starts at a position drawn uniformly from ``[0, len(tokens) - seq_len - 1]``.

    :raises ValueError: as :func:`batches`.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("seq_len", seq_len)
    _check_tokens(tokens, seq_len)
    starts = torch.randint(tokens.numel() - seq_len, (batch_size, 1), generator=generator)
    window = tokens[(starts + torch.arange(seq_len + 1)).to(tokens.device)]  # (B, T + 1)
    return window[:, :-1], window[:, 1:]


def sample_sequences(x: Tensor, y: Tensor, batch_size: int, seq_len: int,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``batch_size`` random rows (with replacement) of stored sequences ``x, y (N, T)``, cut to
    their first ``seq_len`` tokens.

    :raises ValueError: if ``seq_len`` exceeds the sequences' length.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("seq_len", seq_len)
    if seq_len > x.shape[1]:
        raise ValueError(f"seq_len {seq_len} exceeds the sequences' length {x.shape[1]}")
    index = torch.randint(x.shape[0], (batch_size,), generator=generator)
    return x[index, :seq_len], y[index, :seq_len]


def batches(tokens: Tensor, batch_size: int, seq_len: int,
            generator: torch.Generator | None = None,
            num_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Random training windows ``(x, y)``, each ``(batch_size, seq_len)``.

    Every window starts at a position drawn uniformly from ``[0, len(tokens) - seq_len - 1]``
    (with replacement), so every token can be a target.

    :param tokens: 1-D integer ids (on any device; batches come on the same device).
    :param batch_size: windows per batch ``B``.
    :param seq_len: window length ``T``.
    :param generator: CPU generator of the window starts (default: torch's global one).
    :param num_batches: stop after this many batches; ``None`` yields forever.
    :raises ValueError: if ``batch_size`` or ``seq_len`` is below 1 or ``tokens`` is shorter
        than ``seq_len + 1``.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("seq_len", seq_len)
    if num_batches is not None:
        _check_positive("num_batches", num_batches)
    _check_tokens(tokens, seq_len)
    drawn = 0
    while num_batches is None or drawn < num_batches:
        yield sample_windows(tokens, batch_size, seq_len, generator)
        drawn += 1


def eval_batches(tokens: Tensor, batch_size: int, seq_len: int, drop_last: bool = True,
                 max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Non-overlapping windows covering ``tokens`` once, in order, for evaluation.

    Window ``i`` has inputs ``tokens[i T : (i + 1) T]`` and targets one further on, so the
    windows predict tokens ``1 .. W T`` exactly once, ``W = (len(tokens) - 1) // T``. Batches
    hold ``batch_size`` windows; the last one may hold fewer.

    :param drop_last: drop the final window shorter than ``seq_len``; if false, it comes last as
        a batch of its own, of shape ``(1, T')`` with ``T' < seq_len``.
    :param max_batches: stop after this many batches; ``None`` covers the whole split.
    :raises ValueError: as :func:`batches`.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("seq_len", seq_len)
    if max_batches is not None:
        _check_positive("max_batches", max_batches)
    _check_tokens(tokens, seq_len)
    num_windows = (tokens.numel() - 1) // seq_len
    covered = num_windows * seq_len
    x = tokens[:covered].view(num_windows, seq_len)  # (W, T)
    y = tokens[1:covered + 1].view(num_windows, seq_len)  # (W, T)
    emitted = 0
    for start in range(0, num_windows, batch_size):
        if max_batches is not None and emitted >= max_batches:
            return
        yield x[start:start + batch_size], y[start:start + batch_size]
        emitted += 1
    rest = tokens.numel() - 1 - covered
    if rest and not drop_last and (max_batches is None or emitted < max_batches):
        yield tokens[covered:covered + rest].unsqueeze(0), tokens[covered + 1:].unsqueeze(0)


def sequence_batches(x: Tensor, y: Tensor, oracle: Tensor, batch_size: int,
                     seq_len: int | None = None, max_batches: int | None = None,
                     shuffle: bool = False, generator: torch.Generator | None = None
                     ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """One pass over stored sequences as ``(x, y, oracle)``, each ``(B, T)``.

    :param batch_size: sequences per batch; the last batch may hold fewer.
    :param seq_len: cut every sequence to its first ``seq_len`` tokens (default: whole).
    :param max_batches: stop after this many batches; ``None`` covers every sequence.
    :param shuffle: visit the sequences in random order (otherwise in stored order).
    :param generator: CPU generator of the shuffle.
    """
    _check_positive("batch_size", batch_size)
    if max_batches is not None:
        _check_positive("max_batches", max_batches)
    cols = slice(None) if seq_len is None else slice(0, seq_len)
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else None
    for i, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        end = start + batch_size
        rows = slice(start, end) if order is None else order[start:end]
        yield x[rows, cols], y[rows, cols], oracle[rows, cols]


def task_batches(task: SyntheticTask, batch_size: int, generator: torch.Generator | None = None,
                 shuffle: bool = True) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """One pass over a synthetic task's sequences as ``(x, y, oracle)``, each ``(B, T)``
    (:func:`sequence_batches` of the task's tensors, shuffled by default).

    :param task: a split from :func:`~bayes_router.data.synthetic.generate_task`.
    """
    return sequence_batches(task.x, task.y, task.oracle, batch_size, shuffle=shuffle,
                            generator=generator)
