import json
import math
import sysconfig
import zlib
from pathlib import Path

import pytest

from bayes_router.data import (
    FILE_SEPARATOR,
    CharVocab,
    SyntheticCorpus,
    TextCorpus,
    corpus_statistics,
    load_corpus,
    stdlib_corpus,
    text_corpus,
)

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def stdlib():
    return stdlib_corpus()


def _expected_split(name):
    bucket = zlib.crc32(name.encode()) % 20
    return {0: "val", 1: "test"}.get(bucket, "train")


def test_stdlib_corpus_is_deterministic(stdlib):
    again = stdlib_corpus()
    assert again == stdlib


def test_stdlib_corpus_follows_the_selection_rule(stdlib):
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = sorted(p.name for p in root.glob("*.py") if p.is_file())
    selected = sorted(f for split in SPLITS for f in stdlib.files[split])
    assert selected == [f for f in expected if f in selected]  # a subset, only non-UTF-8 skipped
    assert len(selected) >= len(expected) - 2
    assert all("/" not in f for f in selected)
    for split in SPLITS:
        assert stdlib.files[split] == sorted(stdlib.files[split])
        assert all(_expected_split(f) == split for f in stdlib.files[split])
    first = stdlib.files["val"][0]
    assert stdlib.val.startswith((root / first).read_text(encoding="utf-8"))


def test_stdlib_splits_are_disjoint_by_file_and_non_empty(stdlib):
    assert stdlib.split_rule == "files"
    names = [set(stdlib.files[split]) for split in SPLITS]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    for split in SPLITS:
        assert stdlib.files[split] and stdlib.split(split)
    assert len(stdlib.train) > len(stdlib.val) and len(stdlib.train) > len(stdlib.test)
    assert stdlib.num_chars > 1_000_000


def test_stdlib_cap_is_deterministic_and_respects_budgets(stdlib):
    capped = stdlib_corpus(max_chars=200_000)
    assert capped == stdlib_corpus(max_chars=200_000)
    assert capped.num_chars <= 200_000
    assert len(capped.val) <= 10_000 and len(capped.test) <= 10_000
    assert len(capped.train) <= 180_000
    for split in SPLITS:
        assert capped.split(split)
        assert stdlib.split(split).startswith(capped.split(split))
        assert set(capped.files[split]) <= set(stdlib.files[split])


def test_single_file_splits_by_contiguous_characters(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(1000))
    path = tmp_path / "book.txt"
    path.write_text(text)
    corpus = text_corpus(path)
    assert corpus.split_rule == "chars"
    assert (len(corpus.train), len(corpus.val), len(corpus.test)) == (900, 50, 50)
    assert corpus.train + corpus.val + corpus.test == text
    assert corpus.files == {split: ["book.txt"] for split in SPLITS}
    capped = text_corpus(path, max_chars=100)
    assert capped.train + capped.val + capped.test == text[:100]


def _folder(root, count):
    for i in range(count):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i:03d}.txt").write_text(f"document {i}\n" * 5)
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("hidden")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: skipped


def test_folder_splits_by_file(tmp_path):
    _folder(tmp_path, 60)
    corpus = text_corpus(tmp_path)
    assert corpus == text_corpus(tmp_path)
    assert corpus.split_rule == "files"
    every = [f for split in SPLITS for f in corpus.files[split]]
    assert len(every) == len(set(every)) == 60
    for split in SPLITS:
        names = corpus.files[split]
        assert names and names == sorted(names)
        assert all(_expected_split(name) == split for name in names)
        expected = FILE_SEPARATOR.join((tmp_path / name).read_text() for name in names)
        assert corpus.split(split) == expected


def test_small_folder_falls_back_to_character_split(tmp_path):
    _folder(tmp_path, 2)
    corpus = text_corpus(tmp_path)
    assert corpus.split_rule == "chars"
    assert all(corpus.split(split) for split in SPLITS)


def test_missing_path_and_empty_folder_are_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        text_corpus(tmp_path / "nope")
    with pytest.raises(ValueError, match="no files"):
        text_corpus(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty"):
        text_corpus(tmp_path)
    with pytest.raises(ValueError, match="max_chars"):
        stdlib_corpus(max_chars=0)


def test_load_corpus_dispatches(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("x" * 100)
    assert isinstance(load_corpus(str(path)), TextCorpus)
    assert load_corpus("stdlib", max_chars=1000).name == "stdlib"
    synthetic = load_corpus("synthetic:copy", seq_len=32, window=8, num_sequences=4,
                            num_eval_sequences=2)
    assert isinstance(synthetic, SyntheticCorpus)
    assert synthetic.train.x.shape == (4, 32) and synthetic.val.x.shape == (2, 32)
    with pytest.raises(ValueError, match="spec"):
        load_corpus("synthetic:nope")
    with pytest.raises(ValueError, match="synthetic"):
        load_corpus(str(path), seq_len=4)


def test_text_statistics_are_counted_correctly():
    corpus = TextCorpus("toy", train="aab\n", val="é", test="a", files={s: ["f"] for s in SPLITS})
    stats = corpus_statistics(corpus)
    json.dumps(stats)
    assert stats["chars"] == {"train": 4, "val": 1, "test": 1, "total": 6}
    assert stats["files"]["total"] == 1
    assert stats["unknown_share"] == pytest.approx(1 / 6)
    assert stats["vocab_coverage"] == pytest.approx(3 / (CharVocab().size - 1))
    assert stats["top_characters"][0] == ["a", pytest.approx(3 / 6)]
    probs = [3 / 6, 1 / 6, 1 / 6, 1 / 6]
    entropy = -sum(p * math.log2(p) for p in probs)
    assert stats["unigram_entropy_bits_per_char"] == pytest.approx(entropy)


def test_statistics_of_stdlib_and_synthetic(stdlib):
    stats = corpus_statistics(stdlib)
    json.dumps(stats)
    assert stats["chars"]["total"] == stdlib.num_chars
    assert stats["unknown_share"] < 0.01
    assert 3.0 < stats["unigram_entropy_bits_per_char"] < 6.5
    synthetic = corpus_statistics(load_corpus("synthetic:mixed", num_sequences=8,
                                              num_eval_sequences=2))
    json.dumps(synthetic)
    shares = synthetic["oracle_label_share"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert min(shares["full"], shares["linear"], shares["local"]) > 0
