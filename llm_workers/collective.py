"""Cold users: REKI-style collective summaries, one per user cluster.

A user with no summary yet gets, as the context of their first prompt, the summary of people
whose first partition looks like theirs, instead of nothing.

Cluster = genre signature: the two most frequent genres among the items the user rated high
(4-5, or all items when none is rated high) in their first partition, e.g. `Comedy|Drama`;
ties break alphabetically; no genres -> `unknown`. It is a fixed quantisation of the user's
item-genre histogram (MovieLens has 18 genres, so at most 171 clusters): deterministic, needs
no training, the same on every worker, and readable on a dashboard.

Each cluster keeps counts over the first partitions of its cold users (genres, titles rated high
and low; the title tables are trimmed to the TOP most frequent). Once `min_users` users have
joined, one collective generation (prompts.collective_prompt) writes the cluster's profile; later
cold users of the cluster start from it. A collective generation that keeps failing is tried
again after `min_users` more users have joined.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from llm_workers.prompts import Activity, ChatPrompt, collective_prompt, split_genres

TOP = 64


def cluster_of(activities: Sequence[Activity]) -> str:
    liked = [a for a in activities if a.value is None or a.value >= 4] or list(activities)
    counts = Counter(g for a in liked for g in split_genres(a.text)[1])
    if not counts:
        return "unknown"
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    return "|".join(sorted(g for g, _ in top))


def new_state() -> dict:
    return {"users": 0, "genres": {}, "liked": {}, "disliked": {}, "summary": None,
            "generated_at_users": 0, "failed_at_users": 0}


def _trim(table: dict) -> dict:
    if len(table) <= TOP:
        return table
    return dict(sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP])


def add_user(state: dict, activities: Sequence[Activity]) -> dict:
    """Fold one cold user's first partition into the cluster's counts (returns a new dict)."""
    state = {**state, "genres": dict(state["genres"]), "liked": dict(state["liked"]),
             "disliked": dict(state["disliked"])}
    state["users"] += 1
    for a in activities:
        title, genres = split_genres(a.text)
        for g in genres:
            state["genres"][g] = state["genres"].get(g, 0) + 1
        if a.value is not None and a.value >= 4:
            state["liked"][title] = state["liked"].get(title, 0) + 1
        elif a.value is not None and a.value <= 2:
            state["disliked"][title] = state["disliked"].get(title, 0) + 1
    state["liked"] = _trim(state["liked"])
    state["disliked"] = _trim(state["disliked"])
    return state


def due(state: dict, min_users: int) -> bool:
    """Time for the cluster's (first) collective generation."""
    return (min_users > 0 and not state.get("summary") and state["users"] >= min_users
            and state["users"] >= state.get("failed_at_users", 0) + (
                min_users if state.get("failed_at_users") else 0))


def prompt(cluster: str, state: dict, *, max_title_chars: int = 120) -> ChatPrompt:
    def top(table: dict, n: int):
        return sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return collective_prompt(cluster, state["users"], top(state["liked"], 10),
                             top(state["disliked"], 5), top(state["genres"], 6),
                             max_title_chars=max_title_chars)
