"""Token ids → strings, as the CSVs show them (raw ``decode([id])``, leading spaces kept).

A token that is part of a UTF-8 character (byte-level BPE splits CJK text into such pieces)
decodes to U+FFFD, so four different pieces would all read ``�``; they are shown by their bytes
instead (``<0xE6><0x97>``), as sentencepiece vocabularies name their byte tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any


class TokenDecoder:
    """``tokenizer.decode([id])`` with a cache, filled in one batch per call of ``decode_many``."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def decode_many(self, ids: Iterable[int]) -> dict[int, str]:
        """Decodes every not-yet-seen id in one ``batch_decode`` call; returns the cache."""
        missing = sorted(set(ids) - self._cache.keys())
        if missing:
            texts = self.tokenizer.batch_decode([[i] for i in missing])
            self._cache.update((i, byte_piece(self.tokenizer, i) if REPLACEMENT in text else text)
                               for i, text in zip(missing, texts))
        return self._cache


REPLACEMENT = "\ufffd"


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-in character → byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}


def byte_piece(tokenizer: Any, token_id: int) -> str:
    """A token that decodes to U+FFFD shown by its bytes: the valid UTF-8 in it as text, every
    other byte as ``<0xNN>``. A sentencepiece byte token keeps its own name (``<0xE6>``); a token
    whose bytes cannot be recovered stays as decoded."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str):
        return tokenizer.decode([token_id])
    if re.fullmatch(r"(<0x[0-9A-Fa-f]{2}>)+", piece):
        return piece.upper().replace("<0X", "<0x")
    decoder = _byte_level_decoder()
    if not all(char in decoder for char in piece):
        return tokenizer.decode([token_id])
    raw = bytes(decoder[char] for char in piece).decode("utf-8", errors="surrogateescape")
    return "".join(f"<0x{ord(char) - 0xDC00:02X}>" if 0xDC80 <= ord(char) <= 0xDCFF else char for char in raw)


def token_text(tokenizer: Any, token_id: int) -> str:
    """The text one token writes, its leading space kept (sentencepiece's ``decode`` drops the
    space of a ``▁`` piece when it decodes it alone)."""
    text = tokenizer.decode([token_id])
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
        return " " + text
    return text


def token_set(tokenizer: Any, words: str | Iterable[str], *, prefixes: bool = True,
              spaces: bool = True) -> list[int]:
    """The token ids that start any of ``words``, as papers measure a concept.

    Each word counts as written (``Buch``) and, with ``spaces``, after a space (`` Buch``). Its
    candidates are the first token the tokenizer writes it with and, with ``prefixes``, every
    prefix the tokenizer writes as one token (``B``, ``Bu``, ``Buc``; `` B``, …). A candidate
    is kept only if the text it decodes to is a non-empty prefix of the word's text: a byte
    fragment of a character (``�``) and a token that spells something else are skipped. Ids
    are unique, in the order found. ``ValueError`` for an empty word, or words no whole-character
    token starts (``東京`` in a byte-level vocabulary that splits ``東`` into bytes).
    """
    words = [words] if isinstance(words, str) else list(words)
    ids: dict[int, None] = {}
    for word in words:
        stripped = word.strip() if isinstance(word, str) else ""
        if not stripped:
            raise ValueError(f"token_set: {word!r} is not a word")
        texts = [stripped] + ([" " + stripped] if spaces else [])
        candidates: list[int] = []
        for text in texts:
            candidates += tokenizer.encode(text, add_special_tokens=False)[:1]
            if prefixes:
                singles = (tokenizer.encode(text[:end], add_special_tokens=False) for end in range(1, len(text)))
                candidates += [single[0] for single in singles if len(single) == 1]
        ids.update(dict.fromkeys(token_id for token_id in dict.fromkeys(candidates)
                                 if _starts(token_text(tokenizer, token_id), texts)))
    if not ids:
        raise ValueError(f"token_set: no whole-character token of the vocabulary starts {', '.join(words)}")
    return list(ids)


def _starts(text: str, words: Iterable[str]) -> bool:
    """Whether ``text`` is a non-empty, whole-character prefix of one of ``words``."""
    return bool(text.strip()) and REPLACEMENT not in text and any(word.startswith(text) for word in words)
