"""`liber produce`: MovieLens into Kafka in timestamp order, keyed by user."""
import pytest

from streams import movielens
from streams.records import BehaviorEvent, Item, decode
from streams.replay import replay, select
from streams.topics import BEHAVIORS, ITEMS, create_topics
from tests.kafka_io import read_topic

pytestmark = pytest.mark.kafka


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


def test_rate_limit_paces_the_replay(settings):
    create_topics(settings, log=lambda m: None)
    result = replay(settings, "ml-100k", limit=300, rate=1000, items=False, progress=False,
                    log=lambda m: None)
    assert result.events == 300 and result.seconds >= 0.25
