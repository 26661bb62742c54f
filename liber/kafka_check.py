"""Check that the configured Kafka answers and accepts our credentials, with a clear message.

kafka-python reports a rejected SASL password only as "Unable to bootstrap" after its retries;
aiokafka (Faust's client) logs the broker's reason. `check()` connects once with aiokafka,
keeps that reason, and raises `KafkaCheckError` with one line naming the settings to fix.
`liber check-kafka` runs it; processes may run it before they start.
"""
from __future__ import annotations

import asyncio
import logging

from core.kafka import aiokafka_security_options
from core.settings import Settings


class KafkaCheckError(RuntimeError):
    """Kafka cannot be used with these settings; the message says why in one line."""


class _Reasons(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check(settings: Settings, timeout_s: float = 15.0) -> dict:
    """Connect and fetch cluster metadata; returns {brokers, security_protocol, user}."""
    from aiokafka import AIOKafkaClient
    from aiokafka.errors import KafkaError

    options = dict(bootstrap_servers=settings.bootstrap_servers,
                   request_timeout_ms=int(timeout_s * 1000), **aiokafka_security_options(settings))
    reasons = _Reasons()
    logger = logging.getLogger("aiokafka")
    logger.addHandler(reasons)

    async def probe() -> int:
        client = AIOKafkaClient(**options)
        try:
            await asyncio.wait_for(client.bootstrap(), timeout_s)
            return len(client.cluster.brokers())
        finally:
            await client.close()

    try:
        brokers = asyncio.run(probe())
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        auth = [m for m in reasons.messages if "Authentication" in m or "SASL" in m.upper()]
        if auth:
            detail = auth[-1].split(": ", 1)[-1]
            raise KafkaCheckError(
                f"Kafka at {settings.bootstrap_servers} rejected the credentials of SASL user "
                f"{settings.sasl_username!r} ({settings.sasl_mechanism}): {detail}; check "
                "LIBER_SASL_USERNAME / LIBER_SASL_PASSWORD / LIBER_SASL_MECHANISM") from None
        raise KafkaCheckError(
            f"Kafka at {settings.bootstrap_servers} ({settings.security_protocol}) cannot be "
            f"reached: {exc or type(exc).__name__}; check LIBER_BOOTSTRAP_SERVERS and "
            "LIBER_SECURITY_PROTOCOL") from None
    finally:
        logger.removeHandler(reasons)
    return {"brokers": brokers, "security_protocol": settings.security_protocol,
            "user": settings.sasl_username or None}
