"""Security plumbing: loopback-only defaults, and SASL/PLAIN against a real local broker."""
from __future__ import annotations

import ipaddress
import time

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaError

from core.kafka import make_consumer
from core.settings import Settings
from liber import kafka_check
from ops import metrics
from ops.local_kafka import free_port
from streams.producer import BehaviorProducer
from core.records import BehaviorEvent, ClosedPartition, decode
from core.topics import PARTITIONS_CLOSED, create_topics
from tests.conftest import base_settings

pytestmark = [pytest.mark.kafka, pytest.mark.reliability]
T0 = 1_000_000_000.0


def listening(port: int) -> set[str]:
    """Addresses with a socket listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(_address(address))
    return found


def _address(hex_address: str) -> str:
    """/proc/net's hex (32-bit words in host order) -> an address; IPv4-mapped IPv6 as IPv4."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return str(ipaddress.IPv4Address(words))
    address = ipaddress.IPv6Address(words)
    return str(address.ipv4_mapped or address)


def test_defaults_bind_loopback_only(kafka):
    defaults = Settings.load(env={})
    assert defaults.bootstrap_servers == "127.0.0.1:9092"
    assert defaults.metrics_host == "127.0.0.1"
    assert defaults.security_protocol == "PLAINTEXT"  # local only; see README for production
    assert listening(kafka.port) == {"127.0.0.1"}
    assert listening(kafka.controller_port) == {"127.0.0.1"}
    port = free_port()
    metrics.serve(defaults.metrics_host, port)  # what every worker calls with its settings
    assert listening(port) == {"127.0.0.1"}


def sasl_settings(broker, tmp_path, password: str) -> Settings:
    return base_settings(bootstrap_servers=broker.bootstrap, topic_prefix="sasl.",
                         app_id="liber-sasl", state_dir=str(tmp_path / "state"),
                         topic_partitions=1, log_level="WARNING", drift_threshold=0.0,
                         max_events=2, security_protocol="SASL_PLAINTEXT",
                         sasl_mechanism="PLAIN", sasl_username="liber", sasl_password=password)


def test_sasl_plain_producer_worker_and_consumer_authenticate(sasl_kafka, tmp_path, start_worker):
    settings = sasl_settings(sasl_kafka, tmp_path, "liber-pw")
    assert listening(sasl_kafka.port) == {"127.0.0.1"}
    create_topics(settings, log=lambda m: None)
    worker = start_worker(settings)  # Faust (aiokafka) with SASL credentials
    with BehaviorProducer(settings) as producer:
        for i in range(2):
            producer.send(BehaviorEvent(f"s{i}", "u1", "i1", "rate", T0 + i, 4.0))
    worker.wait_metric("liber_events_in_total", 2, timeout=120)
    consumer = make_consumer(settings, enable_auto_commit=False)
    try:
        tp = TopicPartition(settings.topic(PARTITIONS_CLOSED), 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        deadline, records = time.monotonic() + 60, []
        while not records and time.monotonic() < deadline:
            records = consumer.poll(timeout_ms=500).get(tp, [])
    finally:
        consumer.close()
    part = decode(ClosedPartition, records[0].value, key=records[0].key)
    assert [e.event_id for e in part.events] == ["s0", "s1"]


def test_sasl_wrong_password_fails_clearly(sasl_kafka, tmp_path):
    good = sasl_settings(sasl_kafka, tmp_path, "liber-pw")
    assert kafka_check.check(good) == {"brokers": 1, "security_protocol": "SASL_PLAINTEXT",
                                       "user": "liber"}
    settings = sasl_settings(sasl_kafka, tmp_path, "not-the-password")
    with pytest.raises(kafka_check.KafkaCheckError) as err:
        kafka_check.check(settings)
    message = str(err.value)
    assert "rejected the credentials of SASL user 'liber'" in message
    assert "Invalid username or password" in message and "LIBER_SASL_PASSWORD" in message
    assert "not-the-password" not in message


def test_plaintext_client_cannot_use_the_sasl_listener(sasl_kafka, tmp_path):
    settings = sasl_settings(sasl_kafka, tmp_path, "liber-pw").replace(
        security_protocol="PLAINTEXT")
    with pytest.raises(KafkaError):
        with BehaviorProducer(settings, max_block_ms=5_000, api_version=(2, 8)) as producer:
            producer.send(BehaviorEvent("p0", "u1", "i1", "rate", T0, 4.0)).get(timeout=10)
