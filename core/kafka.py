"""The one place that talks to Kafka clients: kafka-python clients built from the settings
(with the one translation of the security settings), the partition of a key, reading a topic
to its end, and waiting until the cluster can be reached."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from core import logs

if TYPE_CHECKING:  # core.settings imports this module lazily: no import at run time
    from core.settings import Settings

log = logging.getLogger("liber.kafka")
UNREACHABLE_BACKOFF_S = (1.0, 10.0)  # first and longest wait between tries


def until_reachable(what: str, call, logger: logging.Logger = log,
                    backoff_s: tuple[float, float] = UNREACHABLE_BACKOFF_S):
    """call() until no retriable Kafka client error says the cluster is out of reach (every
    bootstrap server down, a request sent to a broker that just died, no leader yet); each
    failure is logged. A worker started while a broker, or the whole cluster, is down waits
    instead of exiting."""
    from kafka.errors import KafkaError
    delay, longest = backoff_s
    tries = 0
    while True:
        tries += 1
        try:
            return call()
        except KafkaError as exc:
            if not getattr(exc, "retriable", False):
                raise
            logs.event(logger, "kafka_unreachable", logging.WARNING, what=what, tries=tries,
                       retry_in_s=delay, error=repr(exc)[:300])
            time.sleep(delay)
            delay = min(longest, delay * 2)


# --- the one translation of the security settings --------------------------------------------
def security_options(settings: Settings) -> dict:
    """Security options in kafka-python's spelling (only security_protocol for PLAINTEXT)."""
    opts: dict[str, object] = {"security_protocol": settings.security_protocol}
    if settings.security_protocol.startswith("SASL"):
        opts.update(sasl_mechanism=settings.sasl_mechanism,
                    sasl_plain_username=settings.sasl_username,
                    sasl_plain_password=settings.sasl_password)
    if settings.ssl_cafile:
        opts["ssl_cafile"] = settings.ssl_cafile
    return opts


def ssl_context(settings: Settings):
    """The SSL context aiokafka and Faust need for SSL and SASL_SSL (they take no cafile), or
    None when the protocol does not use SSL. Verifies against `ssl_cafile`, else the system CAs."""
    if settings.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    import ssl
    return ssl.create_default_context(cafile=settings.ssl_cafile or None)


def aiokafka_security_options(settings: Settings) -> dict:
    """`security_options` in aiokafka's spelling: an SSL context instead of a CA file."""
    opts = security_options(settings)
    opts.pop("ssl_cafile", None)
    context = ssl_context(settings)
    if context is not None:
        opts["ssl_context"] = context
    return opts


def client_options(settings: Settings, **options) -> dict:
    """Bootstrap servers and security options for a kafka-python client, then `options`
    (a caller's own: acks, group_id, client_id, ...; they win over the defaults)."""
    return {"bootstrap_servers": settings.bootstrap_servers, **security_options(settings),
            **options}


# --- the one client factory ------------------------------------------------------------------
def make_producer(settings: Settings, **options):
    """A kafka-python KafkaProducer for `settings`' cluster.

    Args:
        settings: bootstrap servers and security settings.
        options: any other KafkaProducer option (acks, max_request_size, ...).
    """
    from kafka import KafkaProducer
    return KafkaProducer(**client_options(settings, **options))


def make_consumer(settings: Settings, *topics: str, **options):
    """A kafka-python KafkaConsumer for `settings`' cluster, subscribed to `topics` if any.

    Args:
        settings: bootstrap servers and security settings.
        topics: full topic names to subscribe to (none: the caller assigns partitions).
        options: any other KafkaConsumer option (group_id, enable_auto_commit, ...).
    """
    from kafka import KafkaConsumer
    return KafkaConsumer(*topics, **client_options(settings, **options))


def make_admin(settings: Settings, **options):
    """A kafka-python KafkaAdminClient for `settings`' cluster; `options` as for the others."""
    from kafka import KafkaAdminClient
    return KafkaAdminClient(**client_options(settings, **options))


# --- where a key goes --------------------------------------------------------------------------
def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives `key` among `partitions`: kafka-python's
    DefaultPartitioner (and aiokafka's, and the Java client's) is murmur2(key) & 0x7fffffff mod n."""
    from kafka.partitioner.default import murmur2
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# --- reading a topic once ----------------------------------------------------------------------
def iter_to_end(settings: Settings, topic: str, *, timeout: float | None = 120.0,
                max_records: int = 50_000, **options):
    """Yield every record of `topic` (a full name), all partitions, from the beginning up to
    the end offsets seen at the start; records written later are not waited for. A topic that
    does not exist yields nothing.

    Args:
        settings: the cluster to read from.
        topic: full topic name (prefix included).
        timeout: seconds until TimeoutError if the end is not reached; None waits for ever.
        max_records: most records taken per poll.
        options: KafkaConsumer options (isolation_level, client_id, fetch_max_bytes, ...);
            auto-commit is off unless they turn it on.
    """
    from kafka import TopicPartition
    consumer = make_consumer(settings, **{"enable_auto_commit": False, **options})
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            return
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: not at its end after {timeout}s")
            for batch in consumer.poll(timeout_ms=500, max_records=max_records).values():
                for record in batch:
                    # a fetch may return records past the end seen at the start
                    if record.offset < ends[TopicPartition(record.topic, record.partition)]:
                        yield record
    finally:
        consumer.close()


def read_to_end(settings: Settings, topic: str, **kwargs) -> list:
    """`iter_to_end` as a list: every record of `topic` up to its end offsets at the start."""
    return list(iter_to_end(settings, topic, **kwargs))
