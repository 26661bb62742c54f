"""The demo's last part: a ranked list for one user before and after new behaviour moves their
interest vector (fusion worker -> user-interests -> ranker cache -> CTR model).

`demo_artifact` picks the UIF artifact: the trained one (`liber train`) when it was trained on
the demo's dataset, otherwise a tiny one trained on the spot (and kept for the next demo).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np

from core.settings import Settings
from models.artifact import ArtifactError, default_artifact_dir, resolve
from models.training import train_tiny_artifact
from models.ranker import ExampleRanker
from streams import movielens
from streams.producer import BehaviorProducer
from streams.replay import rating_event, select

SHOW = 5
CANDIDATES = 12


def demo_artifact(settings: Settings, dataset: str, log=print) -> Path:
    try:
        path = resolve(default_artifact_dir(settings))
        import json
        if json.loads((path / "manifest.json").read_text()).get("dataset") == dataset:
            log(f"  UIF artifact: {path} (trained by `liber train`)")
            return path
        log(f"  the trained UIF artifact {path.name} is for another dataset than {dataset}")
    except ArtifactError:
        log("  no trained UIF artifact (`liber train` makes one)")
    root = Path(settings.home) / "models" / f"uif-demo-tiny-{dataset}"
    try:
        path = resolve(root)
        log(f"  using the tiny demo artifact {path} (trained earlier on a few users: its "
            f"vectors show the plumbing, not recommendation quality)")
    except ArtifactError:
        log("  training a tiny UIF artifact now (models.training.train_tiny_artifact: 16 "
            "users, one epoch; its vectors show the plumbing, not recommendation quality)")
        path = train_tiny_artifact(settings, root, dataset=dataset)
        log(f"  tiny artifact: {path}")
    return path


def _wait_version(ranker: ExampleRanker, user: str, above: int | None, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranker.cache.sync(timeout_s=30)
        hit = ranker.cache.get(user)
        if hit is not None and (above is None or hit[0] > above):
            return hit[0]
        time.sleep(2)
    raise TimeoutError(f"user {user}: no interest vector above version {above} after "
                       f"{timeout:.0f}s")


def _newest_summary_seq(settings: Settings, user: str) -> int:
    """The seq of the user's newest valid summary on `summaries` (0: none)."""
    from core.kafka import iter_to_end
    from core.records import InvalidRecord, Summary, decode
    from core.topics import SUMMARIES
    newest = 0
    for record in iter_to_end(settings, settings.topic(SUMMARIES), timeout=None, max_records=500):
        try:
            summary = decode(Summary, record.value, key=record.key)
        except InvalidRecord:
            continue
        if summary.user_id == user:
            newest = max(newest, summary.seq)
    return newest


def _print(ranking, titles: dict, label: str) -> None:
    kind = "collective stand-in" if ranking.collective else "own vector"
    print(f"  {label} (interest vector version {ranking.version}, {kind}):")
    for rank, (item, score) in enumerate(ranking.items, 1):
        print(f"    {rank}. {score:.4f}  {titles.get(item, item)}")


def show_before_after(settings: Settings, dataset: str, users: list[str], per_user: int | None,
                      artifact: Path, timeout: float = 1800) -> None:
    """Rank popular unseen movies for the first of `users` with enough later events, replay
    the user's next `max_events` events (so at least one partition closes), wait for the new
    vector and rank again."""
    logging.getLogger("kafka").setLevel(logging.ERROR)  # client chatter would break the list
    data_dir = movielens.fetch(settings.home, datasets=(dataset,), log=lambda m: None)[dataset]
    ratings = movielens.load_ratings(data_dir, dataset)
    titles = {m.item_id: f"{m.title} [{'|'.join(m.genres)}]"
              for m in movielens.load_items(data_dir, dataset)}
    for user in users:
        mine = [r for r in ratings if r.user_id == user]
        sent = select(mine, per_user=per_user) if per_user else mine
        new = mine[len(sent):len(sent) + settings.max_events]
        if len(new) == settings.max_events:
            break
    else:
        print(f"  none of users {users} has {settings.max_events} later events in {dataset} "
              f"to replay (run with a smaller --per-user)")
        return
    popular = [item for item, _ in Counter(r.item_id for r in ratings).most_common(200)]
    seen = {r.item_id for r in sent + new}
    candidates = [i for i in popular if i not in seen][:CANDIDATES]
    ranker = ExampleRanker.open(settings, artifact, Path(settings.state_path) / "ranker-cache")
    try:
        newest = _newest_summary_seq(settings, user)  # rank with the newest vector
        version = _wait_version(ranker, user, newest - 1, timeout=300)
        history, rates = [r.item_id for r in sent], [r.rating for r in sent]
        before = ranker.rank(user, history, candidates, history_ratings=rates, top=SHOW)
        old_vector = ranker.cache.get(user)[1]
        _print(before, titles, f"user {user}, top {SHOW} of {len(candidates)} popular unseen "
                               f"movies")
        print(f"  replaying the user's next {len(new)} ratings: "
              + "; ".join(titles.get(r.item_id, r.item_id)[:40] for r in new[:3]) + " ...")
        with BehaviorProducer(settings) as producer:
            for r in new:
                producer.send(rating_event(dataset, r))
        _wait_version(ranker, user, version, timeout=timeout)
        history += [r.item_id for r in new]
        rates += [r.rating for r in new]
        after = ranker.rank(user, history, candidates, history_ratings=rates, top=SHOW)
        _print(after, titles, "after the new partition's summary")
        full = ranker.scorer.score(ranker.cache.get(user)[1], history, candidates, rates)
        old = ranker.scorer.score(old_vector, history, candidates, rates)
        moved = float(np.mean(np.abs(full - old)))
        # a tiny artifact moves scores by 1e-5 or so: show the size, not 0.0000
        print(f"  on the same new history, the new vector alone moves the {len(candidates)} "
              f"scores by {moved:{'.4f' if moved >= 1e-3 else '.1e'}} on average")
    finally:
        ranker.cache.close()
