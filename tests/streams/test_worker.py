"""streams/worker.py: the watchdog that turns a wedged worker into an exit, and the discard of a
local store a crash left behind."""
from __future__ import annotations

from types import SimpleNamespace

from streams.worker import CLEAN_MARKER, RebalanceWatchdog, discard_unclean_state


class FakeTask:
    def __init__(self, done: bool = False):
        self._done = done

    def done(self) -> bool:
        return self._done


def fake_app(remaining: int = 0, heartbeat: FakeTask | None = FakeTask(), started: bool = True):
    """What the watchdog reads of a Faust app: recovery's remaining records and, through
    Faust's consumer thread, aiokafka's coordinator and its heartbeat task."""
    recovery = SimpleNamespace(active_remaining_total=lambda: app.remaining)
    coordinator = SimpleNamespace(_heartbeat_task=heartbeat)
    consumer = SimpleNamespace(_thread=SimpleNamespace(_consumer=SimpleNamespace(
        _coordinator=coordinator))) if started else None
    app = SimpleNamespace(remaining=remaining, rebalancing=True, _consumer=consumer,
                          tables=SimpleNamespace(recovery=recovery), coordinator=coordinator)
    return app


def watchdog(app, stall_s: float = 100.0) -> RebalanceWatchdog:
    dog = RebalanceWatchdog(app, stall_s=stall_s, exit=lambda code: None)
    dog.since = 0.0
    return dog


def test_a_rebalance_that_never_ends_is_a_stall():
    dog = watchdog(fake_app())
    assert not dog.check(0.0)
    assert not dog.check(99.0)
    assert dog.check(100.0)


def test_recovery_progress_and_an_ended_rebalance_are_not_stalls():
    app = fake_app(remaining=500)
    dog = watchdog(app)
    dog.check(0.0)
    app.remaining = 400            # recovery read records: the clock starts again
    assert not dog.check(90.0)
    assert not dog.check(189.0)
    assert dog.check(190.0)
    dog.ended()                    # the rebalance ended: nothing to watch
    assert not dog.check(1000.0)
    dog.started()                  # a new one is watched from when it started
    assert dog.since is not None


def test_a_consumer_without_heartbeats_for_the_stall_time_is_a_stall():
    app = fake_app(heartbeat=FakeTask())
    dog = watchdog(app)
    dog.ended()
    assert not dog.check(0.0)
    app.coordinator._heartbeat_task = None      # joining: no heartbeats for a while
    assert not dog.check(10.0)
    assert not dog.check(60.0)
    app.coordinator._heartbeat_task = FakeTask()  # joined again: the clock is reset
    assert not dog.check(70.0)
    app.coordinator._heartbeat_task = FakeTask(done=True)  # the task ended and none replaced it
    assert not dog.check(80.0)
    assert not dog.check(179.0)
    assert dog.check(180.0)


def test_a_consumer_not_started_yet_is_left_to_the_start_watch():
    dog = watchdog(fake_app(started=False))
    dog.ended()
    assert not dog.check(10_000.0)


def test_a_clean_stop_keeps_the_store_and_a_crash_discards_it(tmp_path):
    tables = tmp_path / "tables"
    (tables / "store").mkdir(parents=True)
    (tables / CLEAN_MARKER).touch()
    assert not discard_unclean_state(tables)        # clean: kept, marker consumed
    assert (tables / "store").exists() and not (tables / CLEAN_MARKER).exists()
    assert discard_unclean_state(tables)            # no marker: a crash; rebuilt from changelog
    assert not tables.exists()
    assert not discard_unclean_state(tables)        # nothing there: nothing to do
