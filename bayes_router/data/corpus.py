"""Character-level text corpora with deterministic train/val/test splits.

The default corpus needs no download: it is the Python standard library's own source code, as
installed with the running interpreter. Any text file or folder can be used instead, and
``"synthetic:<task>"`` names a synthetic oracle task or preset (:mod:`bayes_router.data.synthetic`).

**Selection rule of the standard-library corpus.** Every regular file ending in ``.py`` that lies
directly in ``sysconfig.get_paths()["stdlib"]`` (top-level modules only: no subpackage, hence no
``test``, ``idlelib`` or ``site-packages``), sorted by file name; files that are not valid UTF-8
are skipped (and logged).

**Split rule.** A file goes to a split by ``zlib.crc32(name) % 20`` of its name (for folders: its
path relative to the folder, with ``/``): 0 is ``val``, 1 is ``test``, 2-19 are ``train`` (18/1/1),
so a file never changes split when other files come or go. Each split concatenates its files in
sorted order, separated by :data:`FILE_SEPARATOR`. If that leaves a split without files (small
folders), or the corpus is a single file, the whole concatenated text is cut into contiguous
character ranges instead: the first 90 % train, the next 5 % val, the last 5 % test.

**Size cap.** ``max_chars`` caps the total deterministically. By-file splits: train keeps at most
``max_chars - 2 * (max_chars // 20)`` characters, val and test at most ``max_chars // 20`` each,
each the prefix of its concatenated text. Character-range splits: the text is cut to its first
``max_chars`` characters before splitting.
"""

from __future__ import annotations

import logging
import math
import sysconfig
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bayes_router.data.charset import UNK_TOKEN, CharVocab
from bayes_router.data.synthetic import (
    ORACLE_LABEL_IDS,
    PRESETS,
    SYNTHETIC_TASKS,
    SyntheticConfig,
    SyntheticCorpus,
    preset_config,
    synthetic_corpus,
)

__all__ = [
    "DEFAULT_SUFFIXES",
    "FILE_SEPARATOR",
    "TextCorpus",
    "corpus_statistics",
    "load_corpus",
    "stdlib_corpus",
    "text_corpus",
]

logger = logging.getLogger(__name__)

#: Written between two files of the same split.
FILE_SEPARATOR = "\n\n"
#: File suffixes that :func:`text_corpus` collects from a folder.
DEFAULT_SUFFIXES = (".txt", ".md", ".rst", ".py")

_SPLITS = ("train", "val", "test")
_MIN_MAX_CHARS = 20


@dataclass(frozen=True)
class TextCorpus:
    """A text corpus cut into train, val and test text.

    :ivar name: short name (``"stdlib"``, or the file or folder name).
    :ivar files: for each split, the files (names relative to the source) it draws from.
    :ivar split_rule: ``"files"`` (whole files per split) or ``"chars"`` (contiguous 90/5/5
        character ranges of the concatenated text).
    :ivar source: where the text came from (a path).
    """

    name: str
    train: str
    val: str
    test: str
    files: dict[str, list[str]] = field(default_factory=dict)
    split_rule: str = "files"
    source: str = ""

    def split(self, name: str) -> str:
        """The text of split ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {name!r}")
        return getattr(self, name)

    @property
    def num_chars(self) -> int:
        """Characters in all three splits together."""
        return sum(len(self.split(name)) for name in _SPLITS)

    def encoded(self, vocab: CharVocab | None = None) -> dict[str, Tensor]:
        """Every split encoded as a 1-D ``LongTensor`` (default vocabulary: :class:`CharVocab`)."""
        vocab = CharVocab() if vocab is None else vocab
        return {name: vocab.encode(self.split(name)) for name in _SPLITS}


def _check_max_chars(max_chars: int | None) -> None:
    if max_chars is None:
        return
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < _MIN_MAX_CHARS:
        raise ValueError(
            f"max_chars must be None or an integer >= {_MIN_MAX_CHARS}, got {max_chars!r}"
        )


def _split_of(name: str) -> str:
    bucket = zlib.crc32(name.encode("utf-8", "surrogatepass")) % 20
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


def _read_texts(paths: Iterable[Path], root: Path) -> dict[str, str]:
    """``{relative name: text}`` of the files that decode as UTF-8 and are not empty."""
    texts = {}
    for path in paths:
        name = path.relative_to(root).as_posix()
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            logger.info("skipping %s: not valid UTF-8", path)
            continue
        if text:
            texts[name] = text
    return texts


def _char_split(name: str, texts: dict[str, str], max_chars: int | None, source: str):
    text = FILE_SEPARATOR.join(texts.values())[:max_chars]
    train_end, val_end = math.floor(0.9 * len(text)), math.floor(0.95 * len(text))
    parts = {"train": text[:train_end], "val": text[train_end:val_end], "test": text[val_end:]}
    if not all(parts.values()):
        raise ValueError(f"{source}: {len(text)} characters are too few to split 90/5/5")
    files = {split: list(texts) for split in _SPLITS}
    return TextCorpus(name, **parts, files=files, split_rule="chars", source=source)


def _build_corpus(name: str, texts: dict[str, str], max_chars: int | None, source: str):
    if not texts:
        raise ValueError(f"path: {source} holds no non-empty UTF-8 text")
    names = {split: [n for n in sorted(texts) if _split_of(n) == split] for split in _SPLITS}
    if len(texts) == 1 or not all(names.values()):
        if len(texts) > 1:
            logger.warning("%s: too few files for a split by file; splitting by characters",
                           source)
        return _char_split(name, dict(sorted(texts.items())), max_chars, source)
    held_out = None if max_chars is None else max_chars // 20
    budget = {"train": None if max_chars is None else max_chars - 2 * held_out,
              "val": held_out, "test": held_out}
    parts, files = {}, {}
    for split in _SPLITS:
        files[split], end = [], 0
        for file_name in names[split]:
            start = end + len(FILE_SEPARATOR) if files[split] else 0
            if budget[split] is not None and start >= budget[split]:
                break  # this file would contribute no character
            files[split].append(file_name)
            end = start + len(texts[file_name])
        parts[split] = FILE_SEPARATOR.join(texts[f] for f in files[split])[:budget[split]]
    return TextCorpus(name, **parts, files=files, split_rule="files", source=source)


def stdlib_corpus(max_chars: int | None = None) -> TextCorpus:
    """The running interpreter's standard-library source (the default corpus, no download).

    See the module docstring for the selection, split and cap rules.

    :param max_chars: cap on the total number of characters; ``None`` keeps everything.
    """
    _check_max_chars(max_chars)
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted((p for p in root.iterdir() if p.suffix == ".py" and p.is_file()),
                   key=lambda p: p.name)
    texts = _read_texts(paths, root)
    corpus = _build_corpus("stdlib", texts, max_chars, str(root))
    logger.info("stdlib corpus: %d files, %d characters", len(texts), corpus.num_chars)
    return corpus


def text_corpus(path: str | Path, max_chars: int | None = None,
                suffixes: Iterable[str] = DEFAULT_SUFFIXES) -> TextCorpus:
    """A corpus from a text file, or from every text file under a folder.

    A folder contributes, recursively and sorted by relative path, every file whose suffix is in
    ``suffixes`` (case-insensitive), skipping hidden files and folders (names starting with
    ``.``) and files that are not UTF-8; its files are split by file. A single file (any suffix)
    is split by contiguous character ranges, 90/5/5.

    :param path: a text file or a folder.
    :param max_chars: cap on the total number of characters; ``None`` keeps everything.
    :param suffixes: file suffixes to collect from a folder, such as ``(".txt", ".md")``.
    :raises ValueError: if ``path`` does not exist or holds no usable text.
    """
    _check_max_chars(max_chars)
    root = Path(path)
    if not root.exists():
        raise ValueError(f"path: {root} does not exist")
    if root.is_file():
        return _build_corpus(root.name, _read_texts([root], root.parent), max_chars, str(root))
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    wanted = {s.lower() if s.startswith(".") else f".{s.lower()}" for s in suffixes}
    if not wanted:
        raise ValueError("suffixes must name at least one file suffix")
    paths = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in wanted
         and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not paths:
        raise ValueError(f"path: {root} holds no files with suffixes {sorted(wanted)}")
    return _build_corpus(root.name, _read_texts(paths, root), max_chars, str(root))


def load_corpus(spec: str | Path, *, max_chars: int | None = None, seed: int = 0,
                **synthetic_options) -> TextCorpus | SyntheticCorpus:
    """Load the corpus a command line or config names.

    :param spec: ``"stdlib"`` (the default corpus), ``"synthetic:<task>"`` with a task of
        :data:`~bayes_router.data.synthetic.SYNTHETIC_TASKS` or a preset of
        :data:`~bayes_router.data.synthetic.PRESETS` (whose ``seq_len`` and ``window`` the
        options override, checked by :func:`~bayes_router.data.synthetic.preset_config`), or a
        path to a text file or folder.
    :param max_chars: cap on the characters of a text corpus (not used by synthetic tasks).
    :param seed: seed of a synthetic task (text corpora are deterministic without one).
    :param synthetic_options: further :class:`~bayes_router.data.synthetic.SyntheticConfig`
        fields (``seq_len``, ``window``, ``vocab_size``, ...) for a synthetic task.
    :raises ValueError: for an unknown synthetic task, options given for a text corpus, or a
        path that does not exist.
    """
    spec = str(spec)
    if spec.strip() == "":
        raise ValueError("spec must be 'stdlib', 'synthetic:<task>' or a text file or folder, "
                         "got an empty string")
    if spec.startswith("synthetic:"):
        task = spec.split(":", 1)[1]
        if task in PRESETS:
            return synthetic_corpus(preset_config(task, seed=seed, **synthetic_options), spec)
        if task not in SYNTHETIC_TASKS:
            names = [*SYNTHETIC_TASKS, *PRESETS]
            raise ValueError(f"spec: unknown synthetic task {task!r}; tasks and presets are "
                             f"{', '.join('synthetic:' + t for t in names)}")
        return synthetic_corpus(SyntheticConfig(task=task, seed=seed, **synthetic_options))
    if synthetic_options:
        raise ValueError(f"options {sorted(synthetic_options)} apply only to synthetic tasks, "
                         f"not to spec {spec!r}")
    if spec == "stdlib":
        return stdlib_corpus(max_chars=max_chars)
    return text_corpus(spec, max_chars=max_chars)


def _unigram(counts: np.ndarray) -> tuple[np.ndarray, float]:
    total = counts.sum()
    probs = counts / max(total, 1)
    nonzero = probs[probs > 0]
    return probs, float(-(nonzero * np.log2(nonzero)).sum())


def corpus_statistics(corpus: TextCorpus | SyntheticCorpus, vocab: CharVocab | None = None,
                      top_k: int = 10) -> dict:
    """Summary numbers of a corpus, JSON-serialisable (``bayes-router data`` prints them).

    For a text corpus: characters and files per split, vocabulary coverage (share of the
    vocabulary's characters that occur), share of characters mapped to ``<unk>``, the ``top_k``
    most frequent vocabulary symbols with their shares, and the unigram entropy in bits per
    character, all over the whole corpus. For a synthetic corpus: sequences and tokens per
    split, the share of each oracle label, top tokens and unigram entropy, over train targets.

    :param vocab: character vocabulary of a text corpus (default :class:`CharVocab`).
    :param top_k: number of most frequent symbols to list.
    """
    if isinstance(corpus, SyntheticCorpus):
        return _synthetic_statistics(corpus, top_k)
    if not isinstance(corpus, TextCorpus):
        raise TypeError(f"corpus must be a TextCorpus or SyntheticCorpus, got {type(corpus)}")
    vocab = CharVocab() if vocab is None else vocab
    ids = torch.cat(list(corpus.encoded(vocab).values())).numpy()
    counts = np.bincount(ids, minlength=vocab.size)
    probs, entropy = _unigram(counts)
    symbols = [UNK_TOKEN, *vocab.chars]
    top = np.argsort(-counts, kind="stable")[:top_k]
    chars = {split: len(corpus.split(split)) for split in _SPLITS}
    files = {split: len(corpus.files.get(split, [])) for split in _SPLITS}
    return {
        "name": corpus.name,
        "kind": "text",
        "source": corpus.source,
        "split_rule": corpus.split_rule,
        "chars": {**chars, "total": sum(chars.values())},
        "files": {**files, "total": len({f for names in corpus.files.values() for f in names})},
        "vocab_size": vocab.size,
        "vocab_coverage": float((counts[1:] > 0).mean()),
        "unknown_share": float(probs[vocab.unk_id]),
        "top_characters": [[symbols[i], float(probs[i])] for i in top if counts[i] > 0],
        "unigram_entropy_bits_per_char": entropy,
    }


def _synthetic_statistics(corpus: SyntheticCorpus, top_k: int) -> dict:
    train = corpus.train
    counts = np.bincount(train.y.flatten().numpy(), minlength=train.vocab_size)
    probs, entropy = _unigram(counts)
    top = np.argsort(-counts, kind="stable")[:top_k]
    return {
        "name": corpus.name,
        "kind": "synthetic",
        "task": corpus.config.task,
        "vocab_size": train.vocab_size,
        "seq_len": corpus.config.seq_len,
        "sequences": {split: corpus.split(split).y.shape[0] for split in _SPLITS},
        "tokens": {split: corpus.split(split).num_tokens for split in _SPLITS},
        "oracle_label_share": {name: train.label_shares()[name] for name in ORACLE_LABEL_IDS},
        "top_tokens": [[int(i), float(probs[i])] for i in top if counts[i] > 0],
        "unigram_entropy_bits_per_token": entropy,
        "config": corpus.config.to_dict(),
    }
