"""What every process does with Kafka clients: wait until the cluster can be reached."""
from __future__ import annotations

import logging
import time

from core import logs

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
