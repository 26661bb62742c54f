"""A small producer API for services that emit behaviour events and catalogue items."""
from __future__ import annotations

from core.kafka import make_producer
from core.settings import Settings
from core.records import BehaviorEvent, Item
from core.topics import BEHAVIORS, ITEMS


class BehaviorProducer:
    """Sends validated records keyed by user (events) or item (catalogue).

    Sends are asynchronous and batched; call `flush()` before relying on delivery. With
    `acks=all` and idempotence on, retries never duplicate a record inside the broker; the
    stream worker still drops duplicate `event_id`s from producers that resend.
    """

    def __init__(self, settings: Settings, **producer_options):
        self.settings = settings
        options = dict(acks="all", linger_ms=20, batch_size=512 * 1024, retries=10,
                       enable_idempotence=True, max_in_flight_requests_per_connection=5)
        options.update(producer_options)
        self._producer = make_producer(settings, client_id=f"{settings.app_id}-producer",
                                       **options)
        self._behaviors = settings.topic(BEHAVIORS)
        self._items = settings.topic(ITEMS)

    def send(self, event: BehaviorEvent):
        return self._producer.send(self._behaviors, key=event.user_id.encode(), value=event.encode())

    def send_item(self, item: Item):
        return self._producer.send(self._items, key=item.item_id.encode(), value=item.encode())

    def send_raw(self, topic: str, key: bytes | None, value: bytes | None, headers=None):
        """Send bytes as they are (tests of hostile input, tools that forward records)."""
        return self._producer.send(self.settings.topic(topic), key=key, value=value,
                                   headers=headers or [])

    def flush(self, timeout: float | None = None) -> None:
        self._producer.flush(timeout)

    def close(self) -> None:
        self._producer.close()

    def __enter__(self) -> "BehaviorProducer":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        self.close()
