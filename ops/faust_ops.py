"""Operations hooks of the Faust stream worker: a sensor (records in/out, rebalances) and a
recovery watcher (progress gauges and log lines with an estimate). `attach(app)` installs both;
nothing here touches the processing path beyond a dict add per record. The Faust hooks used
here (sensor methods, app.tables.recovery, app.assignor) are checked with the stream worker's
in tests/streams/test_faust_compat.py."""
from __future__ import annotations

import logging
import threading
import time

import faust

from core import logs
from ops import metrics

log = logging.getLogger("liber.stream")
PROGRESS_EVERY_S = 5.0


class OpsSensor(faust.Sensor):
    # Called for every record: one dict add, the counts are read at scrape time.
    _in, _out = metrics.RECORDS_IN.counts, metrics.RECORDS_OUT.counts

    def on_message_in(self, tp, offset, message) -> None:
        self._in[tp.topic] += 1

    def on_send_completed(self, producer, state, metadata) -> None:
        self._out[metadata.topic] += 1

    def on_rebalance_start(self, app) -> dict:
        metrics.REBALANCES.inc()
        logs.event(log, "rebalance", phase="start")
        return {"started": time.monotonic()}

    def on_rebalance_end(self, app, state) -> None:
        try:
            actives = list(app.assignor.assigned_actives())
        except Exception:  # noqa: BLE001 - a log line must not break a rebalance
            actives = []
        assigned = sorted(f"{tp.topic}:{tp.partition}" for tp in actives)
        per_topic: dict[str, int] = {}
        for tp in actives:
            per_topic[tp.topic] = per_topic.get(tp.topic, 0) + 1
        metrics.ASSIGNED_PARTITIONS.clear()
        for topic, count in per_topic.items():
            metrics.ASSIGNED_PARTITIONS.labels(topic=topic).set(count)
        seconds = time.monotonic() - state["started"] if state else None
        logs.event(log, "rebalance", phase="end", assigned=assigned,
                   seconds=round(seconds, 3) if seconds is not None else None)


class RecoveryWatcher(threading.Thread):
    """Samples Faust's table recovery once a second: remaining changelog records as gauges, and
    every PROGRESS_EVERY_S a `recovery` log line with the rate and an estimate of the time left.
    Reads the recovery service's counters from another thread: a sample that races with the
    event loop is skipped, never fatal."""

    def __init__(self, app, interval_s: float = 1.0):
        super().__init__(name="liber-recovery", daemon=True)
        self.app, self.interval_s = app, interval_s
        self._halt = threading.Event()

    def sample(self) -> tuple[bool, int] | None:
        try:
            recovery = self.app.tables.recovery
            return bool(recovery.in_recovery), int(recovery.active_remaining_total())
        except Exception:  # noqa: BLE001 - not started yet, or a dict changed under us
            return None

    def run(self) -> None:
        started = last_log = last_remaining = first_remaining = None
        while not self._halt.wait(self.interval_s):
            sample = self.sample()
            if sample is None:
                continue
            active, remaining = sample
            metrics.RECOVERY_IN_PROGRESS.set(1 if active else 0)
            metrics.RECOVERY_REMAINING.set(remaining if active else 0)
            now = time.monotonic()
            if active and remaining:
                if started is None:
                    started, last_log, last_remaining, first_remaining = now, now, remaining, remaining
                    logs.event(log, "recovery", phase="start", remaining_records=remaining)
                elif now - last_log >= PROGRESS_EVERY_S:
                    rate = max(0.0, (last_remaining - remaining) / (now - last_log))
                    logs.event(log, "recovery", phase="progress", remaining_records=remaining,
                               records_per_s=round(rate, 1),
                               eta_s=round(remaining / rate, 1) if rate else None)
                    last_log, last_remaining = now, remaining
            elif started is not None and not active:
                logs.event(log, "recovery", phase="done", restored_records=first_remaining,
                           seconds=round(now - started, 1))
                started = None

    def stop(self) -> None:
        self._halt.set()


def attach(app) -> RecoveryWatcher:
    app.sensors.add(OpsSensor())
    watcher = RecoveryWatcher(app)
    watcher.start()
    return watcher
