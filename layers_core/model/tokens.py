"""Token ids → strings, as the CSVs show them (raw ``decode([id])``, leading spaces kept)."""

from __future__ import annotations

from collections.abc import Iterable
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
            self._cache.update(zip(missing, texts))
        return self._cache
