"""Would a person accept these summaries? Figures over (prompt, answer) pairs, no model needed.

- `repeated_3gram_share`: answers in which some word 3-gram occurs 3 or more times (a loop);
- `distinct_2`: distinct word bigrams over all bigrams of all answers (low: every user reads
  the same);
- `invented_title_share`: answers naming a title that is not in their prompt. A title is named
  when a catalogue title of at least two words (year and a trailing ", The" dropped) or a
  double-quoted span stands in the answer;
- `genre_precision`: genre words of the answers (MovieLens genres and their usual forms:
  "comedies", "romantic", "science fiction") that are genres of the prompt's items or words of
  its previous profile, over all genre words named;
- `mean_words`: the answers' mean length in words; `examples`: a few answers as they are.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

# word form -> MovieLens genre
GENRE_WORDS = {
    "action": "Action", "adventure": "Adventure", "adventures": "Adventure",
    "animation": "Animation", "animated": "Animation", "cartoons": "Animation",
    "children's": "Children's", "children": "Children's", "kids": "Children's",
    "comedy": "Comedy", "comedies": "Comedy", "comedic": "Comedy",
    "crime": "Crime", "documentary": "Documentary",
    "documentaries": "Documentary", "drama": "Drama", "dramas": "Drama", "dramatic": "Drama",
    "fantasy": "Fantasy", "film-noir": "Film-Noir", "noir": "Film-Noir", "horror": "Horror",
    "musical": "Musical", "musicals": "Musical", "mystery": "Mystery", "mysteries": "Mystery",
    "romance": "Romance", "romances": "Romance", "romantic": "Romance", "sci-fi": "Sci-Fi",
    "science fiction": "Sci-Fi", "scifi": "Sci-Fi", "thriller": "Thriller",
    "thrillers": "Thriller", "war": "War", "western": "Western", "westerns": "Western",
}
_GENRE_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, GENRE_WORDS), key=len,
                                                reverse=True)) + r")\b", re.I)
_WORD = re.compile(r"[a-z0-9']+(?:-[a-z0-9']+)*")
_QUOTED = re.compile(r'"([^"]{3,80})"')
_ITEM_GENRES = re.compile(r"\[([^\[\]]+)\]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def genres_named(text: str) -> list[str]:
    return [GENRE_WORDS[m.group(1).lower()] for m in _GENRE_RE.finditer(text)]


def has_loop(text: str, n: int = 3, times: int = 3) -> bool:
    w = words(text)
    counts = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return any(c >= times for c in counts.values())


def title_key(title: str) -> str:
    """`Matrix, The (1999)` -> `the matrix`: how a person would write it in prose."""
    t = re.sub(r"\s*\(\d{4}\)\s*$", "", title.strip())
    t = re.sub(r"\s*\([^()]*\)\s*$", "", t)          # alternative titles in brackets
    m = re.match(r"^(.*), (The|A|An)$", t)
    if m:
        t = f"{m.group(2)} {m.group(1)}"
    return " ".join(words(t))


class TitleFinder:
    """Finds catalogue titles of two words or more in free text (word boundaries)."""

    def __init__(self, titles: Iterable[str]):
        keys = {title_key(t) for t in titles}
        self.keys = {k for k in keys if len(k.split()) >= 2}

    def find(self, text: str) -> set[str]:
        w = words(text)
        found = set()
        for n in range(2, 9):
            for i in range(len(w) - n + 1):
                key = " ".join(w[i:i + n])
                if key in self.keys:
                    found.add(key)
        return found


def measure(pairs: Sequence[tuple[str, str]], titles: Iterable[str], *,
            examples: int = 5) -> dict:
    """pairs: (prompt text the model saw, answer text). titles: the catalogue's titles."""
    finder = TitleFinder(titles)
    loops = invented = named = genre_ok = 0
    bigrams: list[tuple[str, str]] = []
    lengths = []
    for prompt, answer in pairs:
        w = words(answer)
        lengths.append(len(w))
        bigrams += list(zip(w, w[1:]))
        loops += has_loop(answer)
        prompt_titles = finder.find(prompt) | {title_key(q) for q in _QUOTED.findall(prompt)}
        answer_titles = finder.find(answer) | {title_key(q) for q in _QUOTED.findall(answer)}
        invented += bool(answer_titles - prompt_titles)
        allowed = {g.strip() for group in _ITEM_GENRES.findall(prompt)
                   for g in group.split("|")} | set(genres_named(prompt))
        for genre in genres_named(answer):
            named += 1
            genre_ok += genre in allowed
    n = len(pairs)
    return {
        "answers": n,
        "repeated_3gram_share": round(loops / n, 4) if n else None,
        "distinct_2": round(len(set(bigrams)) / len(bigrams), 4) if bigrams else None,
        "invented_title_share": round(invented / n, 4) if n else None,
        "genre_precision": round(genre_ok / named, 4) if named else None,
        "genre_words": named,
        "mean_words": round(sum(lengths) / n, 1) if n else None,
        "examples": [a for _, a in pairs[:examples]],
    }
