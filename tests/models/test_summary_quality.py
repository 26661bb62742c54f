"""Summary quality figures on hand-made answers whose right values are known."""
from __future__ import annotations

from models import summary_quality as q

TITLES = ["Matrix, The (1999) [Action|Sci-Fi]", "Star Wars (1977)", "Heat (1995)",
          "Toy Story (1995)"]


def test_loops_titles_and_genres_are_counted_as_a_reader_would():
    prompt = ('Rated high (4-5): "Matrix, The (1999)" [Action|Sci-Fi]; "Heat (1995)" [Crime]\n'
              "Liked genres: Action, Sci-Fi, Crime.")
    pairs = [
        (prompt, "SUMMARY: Likes action and sci-fi like The Matrix.\nPROFILE: Enjoys crime."),
        (prompt, "SUMMARY: Likes action, action, action, action, action."),  # a loop
        (prompt, "SUMMARY: Likes Star Wars and horror."),   # invented title, genre not shown
        (prompt, "SUMMARY: Likes thrillers."),              # genre not in the prompt
    ]
    out = q.measure(pairs, TITLES, examples=2)
    assert out["answers"] == 4
    assert out["repeated_3gram_share"] == 0.25
    assert out["invented_title_share"] == 0.25
    # action, sci-fi, crime, action x5 fine; horror and thrillers are not in the prompt
    assert out["genre_words"] == 10 and out["genre_precision"] == 0.8
    assert len(out["examples"]) == 2 and 0 < out["distinct_2"] < 1


def test_title_key_matches_prose_forms():
    assert q.title_key("Matrix, The (1999)") == "the matrix"
    assert q.title_key("Star Wars: Episode IV (1977)") == "star wars episode iv"
    assert q.TitleFinder(TITLES).find("i loved toy story and heat") == {"toy story"}
    assert not q.has_loop("likes action and likes drama") and q.has_loop("a b c a b c a b c")
