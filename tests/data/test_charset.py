import json

import pytest
import torch

from bayes_router.data import DEFAULT_CHARS, CharVocab


def test_default_vocabulary_is_printable_ascii_tab_newline_and_unk():
    vocab = CharVocab()
    expected = {chr(c) for c in range(32, 127)} | {"\t", "\n"}
    assert set(vocab.chars) == expected
    assert vocab.size == len(expected) + 1 <= 128
    assert vocab.unk_id == 0


def test_round_trip_of_known_characters():
    vocab = CharVocab()
    text = "def f(x):\n\treturn x ** 2  # ~`{}|\\'\"\n"
    ids = vocab.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert vocab.decode(ids) == text
    assert vocab.decode(ids.tolist()) == text
    assert int(ids.min()) >= 1 and int(ids.max()) < vocab.size


def test_every_known_character_has_its_own_id():
    vocab = CharVocab()
    ids = vocab.encode(DEFAULT_CHARS)
    assert ids.tolist() == list(range(1, vocab.size))


@pytest.mark.parametrize("char", ["é", "\u2603", "\U0001F600", "\x00", "\x7f", "\r", "\ud800"])
def test_unknown_characters_map_to_unk(char):
    vocab = CharVocab()
    ids = vocab.encode(f"a{char}b")
    assert ids.tolist() == [vocab.encode("a").item(), vocab.unk_id, vocab.encode("b").item()]
    assert vocab.decode(ids, unknown="?") == "a?b"


def test_empty_text():
    vocab = CharVocab()
    assert vocab.encode("").shape == (0,)
    assert vocab.decode(torch.zeros(0, dtype=torch.long)) == ""


def test_decode_rejects_out_of_range_ids():
    vocab = CharVocab()
    with pytest.raises(ValueError, match="ids"):
        vocab.decode([vocab.size])
    with pytest.raises(ValueError, match="ids"):
        vocab.decode(torch.tensor([-1]))
    with pytest.raises(ValueError, match="1-D"):
        vocab.decode(torch.zeros(2, 2, dtype=torch.long))


def test_dict_round_trip_through_json():
    vocab = CharVocab()
    restored = CharVocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert restored == vocab
    assert torch.equal(restored.encode("hello\tworld\n"), vocab.encode("hello\tworld\n"))


def test_custom_vocabulary_and_bad_input():
    vocab = CharVocab("ab")
    assert vocab.size == 3
    assert vocab.encode("abc").tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="chars"):
        CharVocab("aa")
    with pytest.raises(ValueError, match="chars"):
        CharVocab("")
    with pytest.raises(ValueError, match="size"):
        CharVocab.from_dict({"chars": "ab", "size": 5})
    with pytest.raises(ValueError, match="chars"):
        CharVocab.from_dict({"type": "CharVocab"})
