"""Corpora: a fixed character vocabulary, real text with deterministic splits, synthetic oracle
tasks, and batching."""

from bayes_router.data.batching import batches, eval_batches, task_batches
from bayes_router.data.charset import DEFAULT_CHARS, UNK_TOKEN, CharVocab
from bayes_router.data.corpus import (
    DEFAULT_SUFFIXES,
    FILE_SEPARATOR,
    TextCorpus,
    corpus_statistics,
    load_corpus,
    stdlib_corpus,
    text_corpus,
)
from bayes_router.data.synthetic import (
    ANY_LABEL,
    ORACLE_LABEL_IDS,
    ORACLE_LABELS,
    SYNTHETIC_TASKS,
    SyntheticConfig,
    SyntheticCorpus,
    SyntheticTask,
    TokenLayout,
    background_probabilities,
    generate_task,
    synthetic_corpus,
    token_layout,
)
from bayes_router.data.tokens import TokenData, token_data

__all__ = [
    "TokenData",
    "token_data",
    "ANY_LABEL",
    "CharVocab",
    "DEFAULT_CHARS",
    "DEFAULT_SUFFIXES",
    "FILE_SEPARATOR",
    "ORACLE_LABELS",
    "ORACLE_LABEL_IDS",
    "SYNTHETIC_TASKS",
    "SyntheticConfig",
    "SyntheticCorpus",
    "SyntheticTask",
    "TextCorpus",
    "TokenLayout",
    "UNK_TOKEN",
    "background_probabilities",
    "batches",
    "corpus_statistics",
    "eval_batches",
    "generate_task",
    "load_corpus",
    "stdlib_corpus",
    "synthetic_corpus",
    "task_batches",
    "text_corpus",
    "token_layout",
]
