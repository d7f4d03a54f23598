"""A fixed character vocabulary for character-level language models.

The default vocabulary holds the printable ASCII characters (code points 32 to 126) plus ``'\\t'``
and ``'\\n'``, 97 characters in all, and one ``<unk>`` id (id 0) to which every other character
maps, so that encoding never fails on unexpected input (non-ASCII letters, emoji, control
characters). With ``<unk>`` the vocabulary has 98 ids, well below the 128 a byte-sized embedding
table allows.

Encoding is vectorised: the text's code points are read as one ``uint32`` array and mapped
through a lookup table, so megabytes of text encode in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

__all__ = ["CharVocab", "DEFAULT_CHARS", "UNK_TOKEN"]

#: ``'\t'``, ``'\n'`` and the printable ASCII characters, in code point order.
DEFAULT_CHARS = "\t\n" + "".join(chr(code) for code in range(32, 127))

#: Name of the id that stands for every character outside the vocabulary.
UNK_TOKEN = "<unk>"


class CharVocab:
    """Map characters to ids and back; any character outside ``chars`` maps to ``<unk>``.

    Id 0 is ``<unk>``; the characters of ``chars`` take ids ``1 .. len(chars)`` in the order
    given. The default is :data:`DEFAULT_CHARS` (98 ids with ``<unk>``).

    :param chars: the known characters, each once.
    :raises ValueError: if ``chars`` is empty or repeats a character.
    """

    unk_id = 0

    def __init__(self, chars: str = DEFAULT_CHARS):
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"chars must be a non-empty string, got {chars!r}")
        repeated = sorted({c for c in chars if chars.count(c) > 1})
        if repeated:
            raise ValueError(f"chars must not repeat a character, repeated: {repeated!r}")
        self._chars = chars
        codes = np.array([ord(c) for c in chars], dtype=np.int64)
        # lookup[code] is the id of code point `code`; the last entry catches every larger code.
        self._lookup = np.full(int(codes.max()) + 2, self.unk_id, dtype=np.int64)
        self._lookup[codes] = np.arange(1, len(chars) + 1)
        self._symbols = np.array([""] + list(chars), dtype=object)

    @property
    def chars(self) -> str:
        """The known characters, in id order (id ``i + 1`` is ``chars[i]``)."""
        return self._chars

    @property
    def size(self) -> int:
        """Number of ids, ``<unk>`` included."""
        return len(self._chars) + 1

    def __len__(self) -> int:
        return self.size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and other._chars == self._chars

    def __hash__(self) -> int:
        return hash(self._chars)

    def __repr__(self) -> str:
        return f"CharVocab(size={self.size})"

    def code_points(self, text: str) -> np.ndarray:
        """The Unicode code points of ``text`` as a ``uint32`` array (lone surrogates kept)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")

    def encode(self, text: str) -> Tensor:
        """Encode ``text`` as a 1-D ``LongTensor`` of ids; unknown characters become ``<unk>``.

        :param text: any string.
        :returns: ids of shape ``(len(text),)``.
        """
        codes = self.code_points(text)
        codes = np.minimum(codes, len(self._lookup) - 1).astype(np.int64)
        return torch.from_numpy(self._lookup[codes])

    def decode(self, ids: Tensor | Iterable[int], unknown: str = "\ufffd") -> str:
        """Turn ids back into text.

        :param ids: a 1-D tensor or a sequence of ids in ``[0, size)``.
        :param unknown: the string written for ``<unk>`` (default U+FFFD, the replacement
            character, so that one id stays one character).
        :raises ValueError: if ``ids`` is not 1-D or holds an id outside ``[0, size)``.
        """
        array = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(list(ids))
        if array.size == 0:
            return ""
        if array.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(array.shape)}")
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {array.dtype}")
        if array.min() < 0 or array.max() >= self.size:
            raise ValueError(
                f"ids must lie in [0, {self.size}), got min {array.min()} and max {array.max()}"
            )
        symbols = self._symbols.copy()
        symbols[self.unk_id] = unknown
        return "".join(symbols[array])

    def to_dict(self) -> dict:
        """A JSON-serialisable description; :meth:`from_dict` rebuilds the same vocabulary."""
        return {
            "type": "CharVocab",
            "chars": self._chars,
            "unk_token": UNK_TOKEN,
            "unk_id": self.unk_id,
            "size": self.size,
        }

    @classmethod
    def from_dict(cls, data: dict) -> CharVocab:
        """Rebuild a vocabulary written by :meth:`to_dict`.

        :raises ValueError: if ``data`` is not such a description or its fields disagree.
        """
        if not isinstance(data, dict):
            raise ValueError(f"data must be a dict from CharVocab.to_dict, got {type(data)}")
        if data.get("type", "CharVocab") != "CharVocab":
            raise ValueError(f"type must be 'CharVocab', got {data.get('type')!r}")
        if "chars" not in data:
            raise ValueError("chars: missing from the vocabulary description")
        vocab = cls(data["chars"])
        if data.get("unk_id", cls.unk_id) != cls.unk_id:
            raise ValueError(f"unk_id must be {cls.unk_id}, got {data['unk_id']!r}")
        if data.get("size", vocab.size) != vocab.size:
            raise ValueError(
                f"size {data['size']!r} disagrees with the {len(vocab.chars)} chars plus <unk>"
            )
        return vocab
