"""Token streams the training loop reads: one interface over text corpora and synthetic tasks.

A :class:`TokenData` draws random training windows ``(x, y)`` of shape ``(B, T)``, iterates a
split once for evaluation, and says how many windows a split holds (the size of the ``batch``
plate, so that the subsampled ELBO is an estimate for the whole training split).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from bayes_router.data.batching import (
    eval_batches,
    sample_sequences,
    sample_windows,
    sequence_batches,
)
from bayes_router.data.charset import CharVocab
from bayes_router.data.corpus import TextCorpus, load_corpus
from bayes_router.data.synthetic import SyntheticCorpus


@dataclass
class TokenData:
    """Encoded splits of a corpus.

    :ivar splits: for a text corpus, split name -> 1-D ids; for a synthetic task, split name ->
        ``(x, y, oracle)`` tensors of shape ``(N, T)``.
    :ivar vocab_size: number of token ids.
    :ivar vocab: the character vocabulary of a text corpus (``None`` for synthetic tasks).
    """

    name: str
    splits: dict
    vocab_size: int
    vocab: CharVocab | None = None
    synthetic: bool = False

    def _split(self, split: str):
        if split not in self.splits:
            raise ValueError(f"split must be one of {sorted(self.splits)}, got {split!r}")
        return self.splits[split]

    def fingerprint(self) -> str:
        """SHA-256 of every split's token ids (and oracle labels): it changes when the corpus
        does, so a run can tell that the data it is evaluated on is not what it trained on."""
        digest = hashlib.sha256()
        for name in sorted(self.splits):
            parts = self.splits[name] if self.synthetic else (self.splits[name],)
            digest.update(name.encode())
            for part in parts:
                digest.update(part.to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def split_length(self, split: str) -> int:
        """Tokens in ``split`` of a text corpus (a synthetic task has sequences instead)."""
        if self.synthetic:
            raise ValueError(f"{self.name} is a synthetic task: its splits hold sequences of "
                             f"their own length, not a token stream")
        return int(self._split(split).numel())

    def num_windows(self, split: str, seq_len: int) -> int:
        """Number of disjoint windows of ``seq_len`` tokens (or sequences) in ``split``."""
        data = self._split(split)
        if self.synthetic:
            return int(data[0].shape[0])
        return max(1, (data.numel() - 1) // seq_len)

    def sample_batch(self, split: str, batch_size: int, seq_len: int,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows ``(x, y)`` of shape ``(batch_size, seq_len)``."""
        data = self._split(split)
        if self.synthetic:
            x, y, _ = data
            return sample_sequences(x, y, batch_size, seq_len, generator)
        if data.numel() < seq_len + 1:
            raise ValueError(f"split {split!r} holds {data.numel()} tokens, fewer than "
                             f"seq_len + 1 = {seq_len + 1}")
        return sample_windows(data, batch_size, seq_len, generator)

    def eval_batches(self, split: str, batch_size: int, seq_len: int,
                     max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Every window of ``split`` once, in order (at most ``max_batches`` batches)."""
        yield from ((x, y) for x, y, _ in self.eval_batches_with_oracle(
            split, batch_size, seq_len, max_batches))

    def eval_batches_with_oracle(self, split: str, batch_size: int, seq_len: int,
                                 max_batches: int | None = None):
        """As :meth:`eval_batches`, with the oracle labels ``(B, T)`` (``None`` for text)."""
        data = self._split(split)
        if not self.synthetic:
            for x, y in eval_batches(data, batch_size, seq_len, max_batches=max_batches):
                yield x, y, None
            return
        yield from sequence_batches(*data, batch_size, seq_len, max_batches=max_batches)


def token_data(spec: str, max_chars: int | None = None, seed: int = 0,
               **synthetic_options) -> TokenData:
    """Load and encode the corpus ``spec`` (``"stdlib"``, a path, or ``"synthetic:<task>"``)."""
    corpus = load_corpus(spec, max_chars=max_chars, seed=seed, **synthetic_options)
    if isinstance(corpus, SyntheticCorpus):
        splits = {name: (task.x, task.y, task.oracle) for name, task in
                  (("train", corpus.train), ("val", corpus.val), ("test", corpus.test))}
        return TokenData(corpus.name, splits, corpus.train.vocab_size, synthetic=True)
    if not isinstance(corpus, TextCorpus):
        raise TypeError(f"unexpected corpus type {type(corpus).__name__}")
    vocab = CharVocab()
    return TokenData(corpus.name, corpus.encoded(vocab), vocab.size, vocab=vocab)
