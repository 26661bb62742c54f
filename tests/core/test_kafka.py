"""core.kafka: the client factory and its security options, key_partition, read_to_end."""
from __future__ import annotations

import ssl
import uuid

import pytest
from kafka.errors import KafkaError

from core import kafka
from core.settings import Settings
from core.topics import BEHAVIORS, create_topics
from tests.conftest import base_settings

SASL = dict(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="liber",
            sasl_password="pw", ssl_cafile="/etc/liber/ca.pem")


# --- security options -------------------------------------------------------------------------
def test_plaintext_options_are_the_bootstrap_servers_only():
    settings = Settings.load(env={}, bootstrap_servers="k1:9092,k2:9092")
    assert kafka.client_options(settings) == {"bootstrap_servers": "k1:9092,k2:9092",
                                              "security_protocol": "PLAINTEXT"}
    assert kafka.ssl_context(settings) is None
    assert kafka.aiokafka_security_options(settings) == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_in_kafka_pythons_spelling_and_a_callers_options_pass_through():
    settings = Settings.load(env={}, **SASL)
    assert kafka.client_options(settings, acks="all", client_id="me") == {
        "bootstrap_servers": "127.0.0.1:9092", "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "liber",
        "sasl_plain_password": "pw", "ssl_cafile": "/etc/liber/ca.pem",
        "acks": "all", "client_id": "me"}


def test_aiokafka_gets_an_ssl_context_instead_of_the_ca_file():
    settings = Settings.load(env={}, security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                             sasl_username="liber", sasl_password="pw")
    opts = kafka.aiokafka_security_options(settings)
    context = opts.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert opts == {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
                    "sasl_plain_username": "liber", "sasl_plain_password": "pw"}
    assert kafka.ssl_context(settings.replace(security_protocol="SASL_PLAINTEXT")) is None


def test_each_factory_builds_its_client_from_the_settings(monkeypatch):
    import kafka as kafka_python
    built = []

    def recorder(name):
        return lambda *topics, **options: built.append((name, topics, options))

    for name in ("KafkaProducer", "KafkaConsumer", "KafkaAdminClient"):
        monkeypatch.setattr(kafka_python, name, recorder(name))
    settings = Settings.load(env={}, **SASL)
    kafka.make_producer(settings, acks="all", max_request_size=1 << 20)
    kafka.make_consumer(settings, "a", "b", group_id="g")
    kafka.make_admin(settings, request_timeout_ms=5000)
    security = kafka.client_options(settings)
    assert built == [
        ("KafkaProducer", (), {**security, "acks": "all", "max_request_size": 1 << 20}),
        ("KafkaConsumer", ("a", "b"), {**security, "group_id": "g"}),
        ("KafkaAdminClient", (), {**security, "request_timeout_ms": 5000})]


# --- key_partition ----------------------------------------------------------------------------
def test_key_partition_is_kafkas_murmur2():
    # Reference hashes from the Java client's tests (Utils.murmur2, signed int32); its default
    # partitioner takes toPositive(hash) % n, i.e. hash & 0x7fffffff.
    java = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536}
    for key, expected in java.items():
        for n in (1, 2, 4, 7):
            assert kafka.key_partition(key, n) == (expected & 0x7FFFFFFF) % n


# --- read_to_end against the real broker -----------------------------------------------------
@pytest.mark.kafka
def test_read_to_end_reads_exactly_the_records_present(settings):
    create_topics(settings, [BEHAVIORS], log=lambda m: None)
    name = settings.topic(BEHAVIORS)
    producer = kafka.make_producer(settings, acks="all")
    try:
        for i in range(700):  # both partitions, more than one poll's worth
            producer.send(name, key=b"u%d" % (i % 13), value=b"%d" % i)
        producer.flush()
        records = kafka.read_to_end(settings, name, timeout=60)
        assert sorted(int(r.value) for r in records) == list(range(700))
        assert {r.partition for r in records} == {0, 1}
        # key_partition is where the producer put each key
        assert all(r.partition == kafka.key_partition(r.key, 2) for r in records)
        producer.send(name, key=b"late", value=b"700").get(30)  # an extra record is seen
        assert sorted(int(r.value) for r in kafka.read_to_end(settings, name)) == list(range(701))
    finally:
        producer.close()
    assert kafka.read_to_end(settings, settings.topic("no-such-topic")) == []


# --- the factory against a SASL broker (tests/conftest.py's sasl_kafka) -----------------------
def _sasl(broker, password: str) -> Settings:
    return base_settings(bootstrap_servers=broker.bootstrap,
                         topic_prefix=f"k{uuid.uuid4().hex[:6]}.", topic_partitions=1,
                         security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="liber", sasl_password=password)


@pytest.mark.kafka
@pytest.mark.reliability
def test_the_factory_authenticates_with_the_sasl_settings(sasl_kafka):
    settings = _sasl(sasl_kafka, "liber-pw")
    create_topics(settings, [BEHAVIORS], log=lambda m: None)  # core.topics: make_admin
    name = settings.topic(BEHAVIORS)
    producer = kafka.make_producer(settings, acks="all")
    try:
        producer.send(name, key=b"u1", value=b"hello").get(30)
    finally:
        producer.close()
    assert [r.value for r in kafka.read_to_end(settings, name, timeout=60)] == [b"hello"]
    plain = kafka.make_producer(settings.replace(security_protocol="PLAINTEXT"),
                                max_block_ms=5_000, api_version=(2, 8))
    try:
        with pytest.raises(KafkaError):  # without the SASL options the listener refuses
            plain.send(name, key=b"u1", value=b"refused").get(timeout=10)
    finally:
        plain.close(timeout=1)
