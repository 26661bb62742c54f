import json
import math

import pytest

from core.records import (MAX_ID_LEN, MAX_TEXT_LEN, BehaviorEvent, ClosedPartition,
                             InterestVector, InvalidRecord, Item, PartitionEvent, Summary, decode)


def test_every_record_type_round_trips():
    records = [
        BehaviorEvent("e1", "u1", "i1", "rate", 1.5e9, 4.0, {"device": "tv"}),
        Item("i1", "Amélie (2001)", {"genres": ["Comedy", "Romance"], "year": 2001}),
        ClosedPartition("u1", 3, (PartitionEvent("e1", "i1", "rate", 1.5e9, 4.0, "Amélie"),),
                        1.5e9, 1.5e9, "max_events"),
        Summary("u1", 3, "likes comedies", "more romance", "comedy fan", 120, 40, "transformers",
                "smollm2", 0.5),
        InterestVector("u1", 3, (0.5, -1.0), 2, "uif-1", 1.7e9, 1.5e9),
    ]
    for record in records:
        key = getattr(record, type(record).KEY_FIELD).encode()
        assert decode(type(record), record.encode(), key=key) == record


def test_old_schema_versions_are_accepted_and_newer_rejected():
    data = json.loads(BehaviorEvent("e1", "u1", "i1", "rate", 10.0).encode())
    data["schema"] = "behavior/0"
    assert decode(BehaviorEvent, json.dumps(data).encode(), key=b"u1").event_id == "e1"
    data["schema"] = "behavior/2"
    with pytest.raises(InvalidRecord) as err:
        decode(BehaviorEvent, json.dumps(data).encode(), key=b"u1")
    assert err.value.reason == "schema_version"


def test_record_of_another_topic_is_rejected():
    raw = Item("i1", "t").encode()
    with pytest.raises(InvalidRecord) as err:
        decode(BehaviorEvent, raw, key=b"i1")
    assert err.value.reason == "schema"


@pytest.mark.parametrize("change, reason", [
    ({"ts": math.inf}, "invalid_value"),
    ({"value": True}, "wrong_type"),
    ({"user_id": ""}, "invalid_value"),
    ({"user_id": "u" * 300}, "oversize"),
    ({"attrs": ["a"]}, "wrong_type"),
    ({"attrs": {"k": 1}}, "invalid_value"),
])
def test_behavior_validation(change, reason):
    data = {"event_id": "e", "user_id": "u", "item_id": "i", "action": "rate", "ts": 1.0, **change}
    with pytest.raises(InvalidRecord) as err:
        BehaviorEvent.from_dict(data)
    assert err.value.reason == reason


def test_far_future_is_relative_to_now():
    event = BehaviorEvent("e", "u", "i", "rate", 1000.0)
    event.check_time(max_future_s=10, now=995.0)
    with pytest.raises(InvalidRecord) as err:
        event.check_time(max_future_s=10, now=900.0)
    assert err.value.reason == "future_timestamp"


def test_interest_vector_dim_must_match():
    data = json.loads(InterestVector("u", 1, (1.0, 2.0), 2, "m", 1.0, 1.0).encode())
    data["dim"] = 3
    with pytest.raises(InvalidRecord, match="dim"):
        decode(InterestVector, json.dumps(data).encode(), key=b"u")


def test_item_text_includes_genres():
    assert Item("1", "Heat (1995)", {"genres": ["Action"]}).text() == "Heat (1995) [Action]"
    assert Item("2", "Untitled").text() == "Untitled"


@pytest.mark.parametrize("attributes, reason", [
    ({"genres": 5}, "wrong_type"),             # used to crash the items agent in Item.text()
    ({"genres": "Drama"}, "wrong_type"),       # used to be joined letter by letter
    ({"genres": ["Drama", 7]}, "wrong_type"),
    ({"genres": ["Drama|Crime"]}, "invalid_value"),
    ({"genres": [""]}, "invalid_value"),
    ({"genres": ["G" * 65]}, "oversize"),
    ({"genres": [f"g{i}" for i in range(40)]}, "invalid_value"),
    ({"year": {"from": 1995}}, "wrong_type"),
    ({"tags": [["nested"]]}, "wrong_type"),
])
def test_item_attributes_are_validated_by_type(attributes, reason):
    raw = json.dumps({"schema": "item/1", "item_id": "i1", "title": "Heat",
                      "attributes": attributes}).encode()
    with pytest.raises(InvalidRecord) as err:
        decode(Item, raw, key=b"i1")
    assert err.value.reason == reason


def test_valid_item_attributes_are_kept():
    attributes = {"genres": ["Action", "Crime"], "year": 1995, "rating": 8.2, "tags": ["a", 1],
                  "sequel": None, "genres_extra": True}
    item = decode(Item, Item("i1", "Heat", attributes).encode(), key=b"i1")
    assert item.attributes == attributes and item.text() == "Heat [Action|Crime]"


def longest_event(n: int, text: str) -> PartitionEvent:
    wide = "\U0001d11e"  # 4 bytes in UTF-8: the widest a valid id can be
    return PartitionEvent(f"{n:04d}" + wide * (MAX_ID_LEN - 4), f"{n:04d}" + wide * (MAX_ID_LEN - 4),
                          "purchase", 1.5e9 + n, -1.2345678901234567e-300, text)


def test_a_longest_title_with_genres_fits_a_partition_event():
    genres = ["Action", "Adventure", "Comedy", "Drama"]
    text = Item("i1", "T" * MAX_TEXT_LEN, {"genres": genres}).text()
    assert len(text) <= MAX_TEXT_LEN and text.endswith(" [Action|Adventure|Comedy|Drama]")
    part = ClosedPartition("u1", 0, (longest_event(0, text),), 1.5e9, 1.5e9, "max_events")
    assert decode(ClosedPartition, part.encode(), key=b"u1").events[0].text == text


def test_a_partition_of_max_events_longest_events_fits_the_payload_limit():
    """Defaults of the settings: max_events events with the longest ids and titles of the
    widest characters (and JSON escapes) are cut to fit max_payload_bytes, deterministically."""
    from tests.conftest import base_settings
    settings = base_settings()
    title = ('\U0001d11e"\\' * MAX_TEXT_LEN)[:MAX_TEXT_LEN]
    text = Item("i1", title, {"genres": ["Drama", "Sci-Fi"]}).text()
    events = tuple(longest_event(n, text) for n in range(settings.max_events))
    part = ClosedPartition("u" * MAX_ID_LEN, 10**9, events, 1.5e9, 1.6e9, "max_events")
    assert len(part.encode()) > settings.max_payload_bytes  # the case to handle
    raw = part.encode_within(settings.max_payload_bytes)
    assert len(raw) <= settings.max_payload_bytes
    assert raw == part.encode_within(settings.max_payload_bytes)
    got = decode(ClosedPartition, raw, key=part.user_id.encode(),
                 max_bytes=settings.max_payload_bytes)
    assert [e.event_id for e in got.events] == [e.event_id for e in events]
    assert all(e.text and text.startswith(e.text[:-1]) for e in got.events)
    small = ClosedPartition("u1", 0, (PartitionEvent("e", "i", "rate", 1.0, None, "Heat"),),
                            1.0, 1.0, "max_gap")
    assert small.encode_within(settings.max_payload_bytes) == small.encode()
