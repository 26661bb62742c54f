"""Cascaded UIL-style prompts for the DARE benchmark: a local stand-in for llm_workers/prompts.py
(written concurrently; the benchmark switches to it once its API settles).

Same shape as the UIL worker's prompts so the benchmark decodes the same kind of text: a
factorised (KAR-style) request over one closed partition, ratings grouped into liked / middling
/ disliked, the user's previous cascaded profile as context, and an answer of labelled lines

    SUMMARY: ...   SHIFT: ...   PROFILE: ...   (PROFILE becomes the next partition's context)

whose first line head is written into the prompt (`ANSWER_PREFIX`), as the worker does.
"""
from __future__ import annotations

import re
from typing import Sequence

SYSTEM = ("You write short, factual profiles of one person's movie interests from their ratings "
          "(1 = disliked, 5 = loved). Answer with exactly the labelled lines asked for, one "
          "line each.")
TASK = ("Consider: genres; directors and actors you know from these titles; themes and plots; "
        "mood and tone; what the person avoids (low ratings).\n"
        "SUMMARY: the interests this new activity shows.\n"
        "SHIFT: how they differ from the previous profile.\n"
        "PROFILE: the updated overall profile, at most three sentences.")
ANSWER_PREFIX = "SUMMARY: Likes"
MAX_CONTEXT_CHARS = 600
_PROFILE = re.compile(r"^\W*PROFILE\W*[:\-]\s*(.+)$", re.M | re.I)


def user_message(movies: Sequence[tuple[str, Sequence[str], float]], previous: str | None) -> str:
    """movies: (title, genres, rating) in the order the user rated them."""
    prev = " ".join((previous or "").split())
    if len(prev) > MAX_CONTEXT_CHARS:
        prev = prev[:MAX_CONTEXT_CHARS].rsplit(" ", 1)[0] + " ..."
    groups = {"Rated high (4-5)": [], "Rated 3": [], "Rated low (1-2)": []}
    for title, genres, rating in movies:
        line = f'"{title}" [{"|".join(genres)}]' if genres else f'"{title}"'
        key = "Rated high (4-5)" if rating >= 4 else "Rated low (1-2)" if rating <= 2 else "Rated 3"
        groups[key].append(line)
    head = f"Previous profile of this person: {prev}" if prev else \
        "Previous profile: none, this person is new."
    lines = [head, "", f"New activity ({len(movies)} items):"]
    lines += [f"{k}: " + "; ".join(v) for k, v in groups.items() if v]
    return "\n".join(lines + ["", TASK])


def messages(movies, previous: str | None) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": user_message(movies, previous)}]


def prompt_ids(tokenizer, movies, previous: str | None) -> list[int]:
    """Token ids of the chat prompt followed by the answer's first line head."""
    text = tokenizer.apply_chat_template(messages(movies, previous), add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]


def next_context(answer: str) -> str:
    """The cascaded summary the next partition sees: the PROFILE line, else the whole answer."""
    match = _PROFILE.search(answer)
    return (match.group(1) if match else ANSWER_PREFIX + answer).strip()
