"""Run the stream worker (Faust) until SIGTERM/SIGINT.

Crash safety: Faust writes the local RocksDB store at once but sends the matching changelog
record later, so after a crash the local store may hold writes that never reached Kafka. A
clean stop leaves a marker; a start without it discards the local store and rebuilds it from
the changelog, the durable truth. (Replayed input is then skipped by the per-user offset kept
in the state, see streams/ubsp_agent.py.)

A start or a rebalance that wedges is cut short by `RebalanceWatchdog`: a worker without
progress for REBALANCE_STALL_S exits non-zero, for its supervisor to restart (a hung worker is
worse than a crashed one). The wedge seen on a new three-node cluster had a cause, now fixed:
after a failed join (Faust's assignor raised KeyError for a global table's changelog the
leader's metadata did not list yet) aiokafka's coordinator waits for its user to read the
error, which Faust never does; streams/faust_compat.CoordinatorErrorsThread reads it and the
consumer joins again. The watchdog stays for wedges not understood yet.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from core import logs
from core.settings import Settings
from ops import metrics

log = logging.getLogger("liber.stream")
CLEAN_MARKER = "CLEAN_SHUTDOWN"
REBALANCE_STALL_S = 180.0  # Faust's own rebalance and session limits are 60 s
STALLED_EXIT = 75  # EX_TEMPFAIL: try again


class RebalanceWatchdog(threading.Thread):
    """Exits the process (STALLED_EXIT) when the start, up to the end of the first rebalance,
    or a later rebalance has gone REBALANCE_STALL_S without ending and without recovery
    progress, or when the consumer has been no live member of its group (no heartbeats) for
    as long. A thread, not a task: it must fire even when the event loop is the thing that is
    stuck. Installed as a Faust sensor's rebalance hooks."""

    def __init__(self, app, stall_s: float = REBALANCE_STALL_S, every_s: float = 5.0,
                 exit=os._exit):
        super().__init__(name="liber-rebalance-watchdog", daemon=True)
        self.app, self.stall_s, self.every_s, self._exit = app, stall_s, every_s, exit
        # armed from the start: the worker must get through its first rebalance too
        self.since: float | None = time.monotonic()  # oldest start not ended, or last progress
        self._remaining = None
        self.not_member_since: float | None = None  # a started consumer with no heartbeats
        self._halt = threading.Event()

    def started(self) -> None:
        if self.since is None:
            self.since = time.monotonic()

    def ended(self) -> None:
        self.since = None

    def check(self, now: float) -> bool:
        """True when the worker is stuck (then it has logged why)."""
        from streams.faust_compat import group_member_alive, recovery_remaining
        try:
            member = group_member_alive(self.app)
        except Exception:  # noqa: BLE001 - a sample racing the consumer thread: no verdict
            member = None
        if member is False:
            self.not_member_since = self.not_member_since or now
            if now - self.not_member_since >= self.stall_s:
                logs.event(log, "group_membership_lost", logging.ERROR,
                           seconds=round(now - self.not_member_since),
                           action="exit for a restart")
                return True
        else:
            self.not_member_since = None
        if self.since is None:
            return False
        try:
            remaining = recovery_remaining(self.app)  # Faust: only once running
        except Exception:  # noqa: BLE001 - a sample racing the event loop: not progress
            remaining = self._remaining
        if remaining != self._remaining:  # recovery read records: progress
            self._remaining = remaining
            self.since = now
            return False
        if now - self.since < self.stall_s:
            return False
        logs.event(log, "rebalance_stalled", logging.ERROR, seconds=round(now - self.since),
                   rebalancing=bool(self.app.rebalancing), action="exit for a restart")
        return True

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            if self.check(time.monotonic()):
                for handler in logging.getLogger().handlers:
                    handler.flush()
                self._exit(STALLED_EXIT)

    def stop(self) -> None:
        self._halt.set()


def watch_rebalances(app, stall_s: float = REBALANCE_STALL_S) -> RebalanceWatchdog:
    import faust

    watchdog = RebalanceWatchdog(app, stall_s)

    class Hooks(faust.Sensor):
        def on_rebalance_start(self, app) -> dict:
            watchdog.started()
            return {}

        def on_rebalance_end(self, app, state) -> None:
            watchdog.ended()

    app.sensors.add(Hooks())
    watchdog.start()
    return watchdog


def discard_unclean_state(table_dir: Path) -> bool:
    """Remove local table stores left by a crash; returns True when something was removed."""
    marker = table_dir / CLEAN_MARKER
    if marker.exists():
        marker.unlink()  # from now on we are running: a crash leaves no marker
        return False
    if table_dir.exists() and any(table_dir.iterdir()):
        shutil.rmtree(table_dir)
        return True
    return False


def run(settings: Settings) -> None:
    import faust  # heavy import: only for the process that runs the worker

    from streams.app import create_app

    logs.started(log, "stream-worker", settings)
    settings.state_path.mkdir(parents=True, exist_ok=True)
    metrics.start(settings, {"stream": settings.state_path / settings.app_id})
    app = create_app(settings)
    from ops import faust_ops
    faust_ops.attach(app)  # records in/out, rebalances, recovery progress
    watch_rebalances(app)
    table_dir = Path(app.conf.tabledir)
    if discard_unclean_state(table_dir):
        log.warning("unclean shutdown before: local RocksDB state in %s discarded, "
                    "recovering it from the changelog", table_dir)
    # The worker allocates a few objects per event and frees them a batch later: at Python's
    # default thresholds (700, 10, 10) the collector ran every few hundred events and its
    # older generations kept rescanning the app's long-lived objects. Freeze what start-up
    # made and collect less often (1.05x to 1.2x events/s, docs/benchmarks.md).
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True,
                          override_logging=False)  # keep core.logs' JSON lines
    clean = False
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        clean = exc.code in (0, None)
        raise
    finally:
        if clean:
            table_dir.mkdir(parents=True, exist_ok=True)
            (table_dir / CLEAN_MARKER).touch()
            log.info("stream worker stopped cleanly")
