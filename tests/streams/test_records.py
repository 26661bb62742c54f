import json
import math

import pytest

from streams.records import (BehaviorEvent, ClosedPartition, InterestVector, InvalidRecord, Item,
                             PartitionEvent, Summary, decode)


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
