"""Replay a MovieLens dataset into Kafka: the catalogue into `items`, ratings into `behaviors`.

Ratings go out in timestamp order (ties in file order), keyed by user; each event id is
`<dataset>:<line>`, so a second replay of the same file is recognised as duplicates.
`in_laps` sends a fixed set of users' events again and again as new events (the soak's fixed
population, where per-user state stays bounded).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

from tqdm import tqdm

from core.settings import Settings
from streams import movielens
from streams.producer import BehaviorProducer
from core.records import BehaviorEvent, Item


@dataclass
class ReplayResult:
    items: int
    events: int
    seconds: float


def movie_item(movie) -> Item:
    attributes = {"genres": list(movie.genres)}
    if movie.year:
        attributes["year"] = movie.year
    return Item(item_id=movie.item_id, title=movie.title, attributes=attributes)


def rating_event(dataset: str, rating) -> BehaviorEvent:
    return BehaviorEvent(event_id=f"{dataset}:{rating.line}", user_id=rating.user_id,
                         item_id=rating.item_id, action="rate", ts=float(rating.ts),
                         value=float(rating.rating))


def select(ratings: list, *, users: int | None = None, limit: int | None = None,
           per_user: int | None = None) -> list:
    """The first `users` users (by first appearance), at most `per_user` events of each (their
    earliest), then the first `limit` events; time order is kept."""
    if users:
        keep: set[str] = set()
        for r in ratings:
            if len(keep) >= users:
                break
            keep.add(r.user_id)
        ratings = [r for r in ratings if r.user_id in keep]
    if per_user:
        taken: dict[str, int] = {}
        kept = []
        for r in ratings:
            if taken.get(r.user_id, 0) < per_user:
                taken[r.user_id] = taken.get(r.user_id, 0) + 1
                kept.append(r)
        ratings = kept
    return ratings[:limit] if limit else ratings


def in_laps(events: list[BehaviorEvent], count: int, *,
            now: float | None = None) -> list[BehaviorEvent]:
    """`count` events made of `events` (one population, in time order) repeated in laps. Lap k
    (from 1) gives each event the id `<id>#k` and moves its time forward by k times (the
    population's time span + 1 s): every lap starts after the previous one ended, so its
    events are new (not duplicates), in time order for every user and never late. Raises
    ValueError when the last lap would lie in the future (`now`, default the clock), where the
    worker would start dead-lettering far-future events."""
    if not events:
        raise ValueError("no events to repeat")
    times = [e.ts for e in events]
    shift = max(times) - min(times) + 1.0
    laps = -(-count // len(events))  # ceil
    newest = max(times) + (laps - 1) * shift
    if newest > (time.time() if now is None else now):
        raise ValueError(f"{laps} laps of this population reach ts={newest:.0f}, in the future: "
                         f"use more users or fewer events")
    out: list[BehaviorEvent] = []
    for lap in range(laps):
        take = events[:count - len(out)]
        out.extend(take if lap == 0 else
                   [replace(e, event_id=f"{e.event_id}#{lap}", ts=e.ts + lap * shift)
                    for e in take])
    return out


def replay(settings: Settings, dataset: str, *, rate: float | None = None, limit: int | None = None,
           users: int | None = None, per_user: int | None = None, items: bool = True,
           events: bool = True, progress: bool = True, log=print) -> ReplayResult:
    """Produce the dataset (`items`: the catalogue, `events`: the ratings); `rate` caps events
    per second (None: as fast as possible)."""
    paths = movielens.fetch(settings.home, datasets=(dataset,), log=log)
    data_dir = paths[dataset]
    ratings = select(movielens.load_ratings(data_dir, dataset), users=users, limit=limit,
                     per_user=per_user) if events else []
    start = time.monotonic()
    n_items = 0
    with BehaviorProducer(settings) as producer:
        if items:
            for movie in movielens.load_items(data_dir, dataset):
                producer.send_item(movie_item(movie))
                n_items += 1
            producer.flush()
            log(f"items: {n_items} catalogue records sent to {settings.topic('items')}")
        if not events:
            return ReplayResult(items=n_items, events=0, seconds=time.monotonic() - start)
        bar = tqdm(total=len(ratings), unit="ev", disable=not progress, mininterval=1.0,
                   desc=f"replay {dataset}")
        for i, rating in enumerate(ratings):
            producer.send(rating_event(dataset, rating))
            if rate and i % 100 == 99:
                ahead = (i + 1) / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            if i % 1000 == 999:
                bar.update(1000)
        bar.update(len(ratings) % 1000)
        bar.close()
    seconds = time.monotonic() - start
    log(f"behaviors: {len(ratings)} events sent to {settings.topic('behaviors')} in {seconds:.1f}s")
    return ReplayResult(items=n_items, events=len(ratings), seconds=seconds)
