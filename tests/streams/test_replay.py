"""`liber produce`: MovieLens into Kafka in timestamp order, keyed by user; laps of a fixed
population (the soak's)."""
import pytest

from streams import movielens
from streams.ubsp import ACCEPTED, CloseRules, add_event, new_state
from core.records import BehaviorEvent, Item, decode
from streams.replay import in_laps, rating_event, replay, select
from core.topics import BEHAVIORS, ITEMS, create_topics
from tests.conftest import base_settings
from tests.kafka_io import read_topic


@pytest.mark.kafka
def test_replay_sends_catalogue_and_events_in_time_order(settings):
    create_topics(settings, log=lambda m: None)
    result = replay(settings, "ml-100k", users=5, progress=False, log=lambda m: None)
    data_dir = movielens.dataset_dir(settings.home, "ml-100k")
    expected = select(movielens.load_ratings(data_dir, "ml-100k"), users=5)
    assert result.events == len(expected) and result.items == 1682

    records = read_topic(settings, BEHAVIORS, expect=result.events)
    events = [decode(BehaviorEvent, r.value, key=r.key) for r in records]
    assert sorted(e.event_id for e in events) == sorted(f"ml-100k:{r.line}" for r in expected)
    assert len({e.user_id for e in events}) == 5
    by_partition: dict[int, list] = {}
    for record, event in zip(records, events):
        assert record.key == event.user_id.encode()
        by_partition.setdefault(record.partition, []).append((event.ts, int(event.event_id.split(":")[1])))
    for sequence in by_partition.values():  # within a partition: time order, ties in file order
        assert sequence == sorted(sequence)

    items = [decode(Item, r.value, key=r.key) for r in read_topic(settings, ITEMS, expect=1682)]
    titles = {i.item_id: i for i in items}
    assert titles["1"].title == "Toy Story (1995)"
    assert titles["1"].attributes == {"genres": ["Animation", "Children's", "Comedy"], "year": 1995}


@pytest.mark.kafka
def test_rate_limit_paces_the_replay(settings):
    create_topics(settings, log=lambda m: None)
    result = replay(settings, "ml-100k", limit=300, rate=1000, items=False, progress=False,
                    log=lambda m: None)
    assert result.events == 300 and result.seconds >= 0.25


def _population(users: int) -> list:
    data_dir = movielens.fetch(base_settings().home, datasets=("ml-100k",), log=lambda m: None)
    ratings = select(movielens.load_ratings(data_dir["ml-100k"], "ml-100k"), users=users)
    return [rating_event("ml-100k", r) for r in ratings]


def test_laps_repeat_the_same_users_as_new_in_order_events():
    population = _population(8)
    count = 2 * len(population) + len(population) // 2  # two and a half laps
    events = in_laps(population, count)
    assert len(events) == count
    assert events[:len(population)] == population  # lap 0 is the population itself
    assert len({e.event_id for e in events}) == count  # new ids: no duplicates
    assert {e.user_id for e in events} == {e.user_id for e in population}
    assert events[len(population)].event_id == f"{population[0].event_id}#1"
    assert [e.ts for e in events] == sorted(e.ts for e in events)  # still in time order
    by_user: dict[str, list] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    for user_events in by_user.values():  # each lap starts after the previous one ended
        laps = [[e.ts for e in user_events if e.event_id.count("#") == 0]]
        laps += [[e.ts for e in user_events if e.event_id.endswith(f"#{k}")] for k in (1, 2)]
        assert max(laps[0]) < min(laps[1]) and max(laps[1]) < min(laps[2])

    # The worker's own rules accept every event: none is a duplicate or late.
    rules = CloseRules()
    states: dict[str, dict] = {}
    outcomes = [add_event(states.setdefault(e.user_id, new_state()), e.user_id, e.event_id,
                          e.item_id, e.action, e.ts, e.value, rules)[0] for e in events]
    assert set(outcomes) == {ACCEPTED}


def test_laps_refuse_to_reach_the_future():
    population = _population(2)
    last = max(e.ts for e in population)
    with pytest.raises(ValueError, match="in the future"):
        in_laps(population, 3 * len(population), now=last + 1000)
    assert len(in_laps(population, len(population), now=last)) == len(population)
