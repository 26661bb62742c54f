"""Cold users: REKI-style collective summaries, one per user cluster.

A user with no summary yet gets, as the context of their first prompt, the summary of people
whose first partition looks like theirs, instead of nothing.

Cluster = the genre signature of the user's first partition (core/clusters.py, shared with the
fusion worker, which serves the cluster's vector), e.g. `Comedy|Drama`.

Each cluster keeps counts over the first partitions of its cold users (genres, titles rated high
and low; the title tables are trimmed to the TOP most frequent). Once `min_users` users have
joined, one collective generation (prompts.collective_prompt) writes the cluster's profile; later
cold users of the cluster start from it. A collective generation that keeps failing is tried
again after `min_users` more users have joined.
"""
from __future__ import annotations

from typing import Sequence

from core.activity import Activity, split_genres
from llm_workers.prompts import ChatPrompt, collective_prompt

TOP = 64


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
