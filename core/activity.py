"""One user event as the text-side code sees it: a prompt, a cluster signature, a CTR sample.

Item texts come from the stream worker as `Title (1995) [Action|Crime]` (Item.text()): the
genres ride in a bracketed suffix, which `split_genres` takes apart.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_GENRES = re.compile(r"^(.*\S)\s*\[([^\[\]]*)\]\s*$", re.S)


@dataclass(frozen=True)
class Activity:
    """One event as a prompt sees it (from `PartitionEvent`, or stored history)."""
    text: str
    action: str = "rate"
    value: float | None = None


def split_genres(text: str) -> tuple[str, tuple[str, ...]]:
    """`Heat (1995) [Action|Crime]` -> ("Heat (1995)", ("Action", "Crime"))."""
    match = _GENRES.match(text)
    if not match:
        return text, ()
    genres = tuple(g.strip() for g in match.group(2).split("|") if g.strip())
    return match.group(1), genres
