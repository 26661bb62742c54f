"""The test helper that reads topics back: an exact count must be able to see extras."""
from __future__ import annotations

import pytest

from streams.producer import BehaviorProducer
from core.topics import BEHAVIORS, create_topics
from tests.kafka_io import read_topic

pytestmark = pytest.mark.kafka


def test_read_topic_with_expect_still_sees_records_past_the_expected_count(settings):
    create_topics(settings, [BEHAVIORS], log=lambda m: None)
    with BehaviorProducer(settings) as producer:
        for i in range(600):  # more than one poll returns (max_poll_records=500)
            producer.send_raw(BEHAVIORS, b"k", b"%d" % i, headers=None)
    assert len(read_topic(settings, BEHAVIORS, expect=500)) == 600
