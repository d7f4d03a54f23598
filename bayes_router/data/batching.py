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

__all__ = ["batches", "eval_batches", "task_batches"]


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
    offsets = torch.arange(seq_len + 1)
    drawn = 0
    while num_batches is None or drawn < num_batches:
        starts = torch.randint(tokens.numel() - seq_len, (batch_size, 1), generator=generator)
        window = tokens[(starts + offsets).to(tokens.device)]  # (B, T + 1)
        yield window[:, :-1], window[:, 1:]
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


def task_batches(task: SyntheticTask, batch_size: int, generator: torch.Generator | None = None,
                 shuffle: bool = True) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """One pass over a synthetic task's sequences as ``(x, y, oracle)``, each ``(B, T)``.

    :param task: a split from :func:`~bayes_router.data.synthetic.generate_task`.
    :param batch_size: sequences per batch; the last batch may hold fewer.
    :param generator: CPU generator of the shuffle.
    :param shuffle: visit the sequences in random order (otherwise in stored order).
    """
    _check_positive("batch_size", batch_size)
    n = task.x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        yield task.x[rows], task.y[rows], task.oracle[rows]
