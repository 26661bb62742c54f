"""The base of the kafka-python workers (LLM and fusion): run loop, stop signals, shutdown,
rebalance callbacks and restore on assignment.

One thread owns the consumer, the producer and the store. `run()` installs SIGTERM/SIGINT
handlers that only set `stopping` (the step in progress finishes, then `shutdown()` drains and
closes). Rebalances reach the worker through `RebalanceForwarder`; an assignment is not restored
inside the callback (kafka-python 3 may run it on the consumer's network thread, where blocking
on the consumer deadlocks) but noted, and the next `poll()` restores those partitions before any
of their records is processed.
"""
from __future__ import annotations

import logging
import signal

from kafka import ConsumerRebalanceListener

from core import logs


class RebalanceForwarder(ConsumerRebalanceListener):
    """Hands kafka-python's rebalance callbacks to a worker's on_revoked / on_assigned."""

    def __init__(self, worker):
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        self.worker.on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned):
        self.worker.on_assigned(set(assigned))


class Worker:
    """A subclass sets `consumer`, `producer` and `store` and writes `step()`; the hooks below
    do nothing unless overridden.

    Args:
        logger: the worker's logger.
        rebalances: a Prometheus counter, one per assignment.
    """
    name = "worker"  # in log lines: "<name> stopped"

    def __init__(self, *, logger: logging.Logger, rebalances):
        self.log, self.rebalances = logger, rebalances
        self.stopping = False
        self._to_restore: set = set()  # assigned, not yet restored

    def subscribe(self, topics: list[str]) -> None:
        self.consumer.subscribe(topics, listener=RebalanceForwarder(self))

    # --- run loop --------------------------------------------------------------------------------
    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.announce()
        try:
            while not self.stopping:
                self.step()
        finally:
            self.shutdown()

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def step(self) -> None:
        raise NotImplementedError

    def announce(self) -> None:
        """Log what the worker runs with, once before the first step."""

    def poll(self, timeout_ms: int) -> dict:
        """The consumer's records, after the partitions assigned since the last poll are
        restored; records of the partitions `restore_assigned` names are dropped (the restore
        set their position: they are fetched again)."""
        records = self.consumer.poll(timeout_ms=timeout_ms)
        if self._to_restore:
            assigned, self._to_restore = self._to_restore, set()
            skip = self.restore_assigned(assigned)
            if skip:
                records = {tp: recs for tp, recs in records.items() if tp not in skip}
        return records

    def restore_assigned(self, assigned: set) -> set:
        """Bring the state of newly assigned partitions up to date and set their positions;
        returns the partitions whose records polled meanwhile must be dropped. A partition that
        could not be restored may be handed back with `retry_restore`."""
        return set()

    def retry_restore(self, partitions: set) -> None:
        """Restore these partitions again at the next poll (those still assigned)."""
        self._to_restore |= partitions & self.consumer.assignment()

    # --- shutdown --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        try:
            self.drain()
        finally:
            self.release()
            self.consumer.close(autocommit=False)
            self.producer.close(timeout=10)
            self.store.close()
            self.log.info("%s stopped", self.name)

    def drain(self) -> None:
        """Finish what is in flight and commit it (shutdown's first part)."""

    def release(self) -> None:
        """Close what the worker holds besides its consumer, producer and store."""

    # --- rebalances ------------------------------------------------------------------------------
    def on_revoked(self, revoked: set) -> None:
        self._to_restore -= revoked

    def on_assigned(self, assigned: set) -> None:
        self.rebalances.inc()
        logs.event(self.log, "rebalance", phase="assigned",
                   assigned=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))
        self._to_restore |= set(assigned)
