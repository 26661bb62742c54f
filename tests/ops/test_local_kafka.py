import os

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from ops.local_kafka import LocalKafka, free_port

pytestmark = pytest.mark.kafka


def test_broker_restarts_with_its_data_and_stops_by_pid(tmp_path, kafka):
    broker = LocalKafka(kafka.home, tmp_path / "b", port=free_port())
    broker.start(log=lambda m: None)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    producer.send("keep", key=b"k", value=b"v1").get(timeout=30)
    producer.close()
    pid = broker.pid()
    broker.stop(log=lambda m: None)
    assert not broker.running() and not broker.pid_file.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    broker.start(log=lambda m: None)  # same data directory: the record is still there
    try:
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, consumer_timeout_ms=10000)
        consumer.assign([TopicPartition("keep", 0)])
        consumer.seek_to_beginning()
        assert [r.value for r in consumer][:1] == [b"v1"]
        consumer.close()
    finally:
        broker.stop(log=lambda m: None)


def test_stale_pid_file_is_not_mistaken_for_a_broker(tmp_path, kafka):
    broker = LocalKafka(kafka.home, tmp_path / "c", port=free_port())
    broker.data_dir.mkdir(parents=True)
    broker.pid_file.write_text(str(os.getpid()))  # a live process, but not a broker
    assert not broker.running()
    broker.stop(log=lambda m: None)  # must not signal the unrelated process
    assert not broker.pid_file.exists()
