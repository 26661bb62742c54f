"""Item prompt texts for the stream worker, read from the `item-text` table and kept in memory.

Global-table reads probe every RocksDB partition; titles almost never change, so the ones found
are kept (bounded by the catalogue size). An item not (yet) in the catalogue gets a placeholder,
which is not kept: its text is used as soon as it arrives.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

log = logging.getLogger("liber.stream")
MAX_WARNED = 100  # items whose missing text is logged, once each


def placeholder(item_id: str) -> str:
    return f"item {item_id}"


class ItemTexts:
    """Args:
        table: item id bytes -> UTF-8 text bytes (the `item-text` GlobalTable, or a dict).
    """

    def __init__(self, table: Mapping[bytes, bytes]):
        self.table = table
        self._cache: dict[str, str] = {}
        self._missing: set[str] = set()

    def text_of(self, item_id: str) -> str:
        """The item's text, or its placeholder."""
        text = self._cache.get(item_id)
        if text is None:
            stored = self.table.get(item_id.encode())
            if stored is None:
                if item_id not in self._missing and len(self._missing) < MAX_WARNED:
                    self._missing.add(item_id)
                    log.warning("item %s has no text in the item-text table: placeholder "
                                "used", item_id)
                return placeholder(item_id)  # do not cache the miss
            text = self._cache[item_id] = stored.decode("utf-8")
        return text

    def known_text(self, item_id: str) -> str | None:
        """The item's text; None when the catalogue does not have it (yet)."""
        text = self.text_of(item_id)
        return None if text == placeholder(item_id) else text

    def forget(self, item_id: str) -> None:
        """Drop the kept text of one item (its title was written again)."""
        self._cache.pop(item_id, None)

    def forget_keys(self, keys: Iterable) -> None:
        """A title written by any worker replaces the one kept in memory (every worker keeps
        its own cache; the items agent of only one of them sees the new record)."""
        for key in keys:
            if isinstance(key, (bytes, bytearray)):
                self._cache.pop(key.decode("utf-8", "replace"), None)
