"""The Faust internals streams/faust_compat.py (and ops/faust_ops.py) rely on are still there
and still behave as the workarounds assume. Each failure names the hook: after a Faust upgrade,
fix the hook in streams/faust_compat.py, then bump its PINNED_VERSION. No broker needed."""
from __future__ import annotations

import asyncio
import importlib
import inspect
from types import SimpleNamespace

import faust
import pytest
from faust.types.tuples import Message

from ops.faust_ops import OpsSensor
from streams import faust_compat
from streams.faust_compat import (GLOBAL_TABLE, QUIET_MONITOR_HOOKS, QuietMonitor,
                                  TrackedGlobalTable, TrackedTable, filed_under)
from streams.ubsp import EventRow


def hook(path: str):
    """The object at a dotted path (module, then attributes), or a failure naming it."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
            break
        except ImportError:
            continue
    else:
        pytest.fail(f"Faust hook {path}: no module of it imports")
    for name in parts[cut:]:
        if not hasattr(obj, name):
            pytest.fail(f"Faust hook {path} is gone in faust-streaming "
                        f"{faust_compat.installed_version()}: streams/faust_compat.py relies on "
                        f"it; see its docstring for what it is used for")
        obj = getattr(obj, name)
    return obj


def same_parameters(ours, theirs, name: str) -> None:
    """An override Faust still calls with the arguments it was written for."""
    mine = list(inspect.signature(ours).parameters)
    faust_s = list(inspect.signature(theirs).parameters)
    assert mine == faust_s, (f"Faust hook {name} changed its parameters from {mine} to "
                             f"{faust_s}: update the override in streams/faust_compat.py")


def in_app(scenario) -> None:
    async def main():
        app = faust.App("test-compat", broker="kafka://127.0.0.1:1", store="memory://",
                        web_enabled=False)
        await scenario(app)

    asyncio.run(main())


def event(app, key: bytes, value: bytes, partition: int, topic: str = "behaviors"):
    message = Message(topic, partition, 0, 0.0, 0, [], key, value, None)
    return faust.Event(app, key, value, [], message)


def test_the_installed_faust_is_the_one_the_hooks_were_checked_against():
    installed = faust_compat.installed_version()
    assert installed == faust_compat.PINNED_VERSION, (
        f"faust-streaming {installed} is installed, streams/faust_compat.py was checked against "
        f"{faust_compat.PINNED_VERSION}: once this module's other tests pass, set PINNED_VERSION")
    assert faust_compat.check_version()


@pytest.mark.parametrize("name", QUIET_MONITOR_HOOKS)
def test_quiet_monitor_overrides_hooks_faust_calls(name):
    theirs = hook(f"faust.sensors.monitor.Monitor.{name}")
    same_parameters(getattr(QuietMonitor, name), theirs, f"Monitor.{name}")
    assert getattr(QuietMonitor, name) is not theirs


@pytest.mark.parametrize("name", ["on_message_in", "on_send_completed", "on_rebalance_start",
                                  "on_rebalance_end"])
def test_ops_sensor_overrides_hooks_faust_calls(name):
    same_parameters(getattr(OpsSensor, name), hook(f"faust.Sensor.{name}"), f"Sensor.{name}")


@pytest.mark.parametrize("path", [
    "faust.tables.base.Collection.send_changelog",
    "faust.tables.base.Collection.apply_changelog_batch",
    "faust.streams.Stream._set_current_event",
    "faust.streams.Stream.ack",
    "faust.streams.Stream.events",
    "faust.streams.current_event",
    "faust.App.consumer_generation_id",
    "faust.App.crash",
    "faust.tables.recovery.Recovery.active_remaining_total",
    "faust.tables.recovery.Recovery.in_recovery",
    "faust.assignor.PartitionAssignor.assigned_actives",
    "mode.utils.queues.FlowControlEvent.clear",
])
def test_hook_exists(path):
    hook(path)


def test_app_state_flags_exist():
    async def scenario(app):
        for name in ("rebalancing", "in_recovery", "consumer_generation_id"):
            assert hasattr(app, name), f"Faust hook App.{name} is gone"
        assert faust_compat.settled(app) and faust_compat.consumer_generation(app) == 0
    in_app(scenario)


def test_table_options_make_a_global_table_with_buffers_of_one():
    params = inspect.signature(hook("faust.tables.base.Collection.__init__")).parameters
    for name in GLOBAL_TABLE:
        assert name in params, f"Faust hook Collection({name}=) is gone: see GLOBAL_TABLE"

    async def scenario(app):
        table = TrackedGlobalTable(app, name="g", partitions=2, key_type=bytes,
                                   value_type=bytes, **GLOBAL_TABLE)
        assert (table.is_global, table.recovery_buffer_size, table.standby_buffer_size) == (
            True, 1, 1), "Faust hook Collection(is_global=, *_buffer_size=) no longer applies"
    in_app(scenario)


def test_table_writes_send_changelogs_through_send_changelog_filed_under_the_event(monkeypatch):
    """TrackedSends sees every changelog record of a table write, and filed_under makes the
    event the one Faust's stores read (faust.streams.current_event)."""
    sent = []

    def fake_send_changelog(self, partition, key, value, key_serializer=None,
                            value_serializer=None):
        sent.append((partition, key, value))
        return SimpleNamespace(message=SimpleNamespace(partition=partition))

    monkeypatch.setattr(faust.tables.base.Collection, "send_changelog", fake_send_changelog)

    async def scenario(app):
        topic = app.topic("behaviors", key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw", partitions=2)
        stream = app.stream(topic)
        table = TrackedTable(app, name="t", partitions=2, key_type=bytes)
        table.sent = []
        first = event(app, b"k1", b"v", partition=1)
        with filed_under(stream) as file:
            file(first)
            assert faust.streams.current_event() is first, (
                "Faust hook Stream._set_current_event no longer sets faust.streams.current_event")
            table[b"k1"] = {"events": [EventRow("e", "i", "rate", 1.0, None)]}
        assert stream.current_event is None, "filed_under did not restore the current event"
        assert [(p, k) for p, k, _ in sent] == [(1, b"k1")], (
            "Faust hook Collection.send_changelog is no longer called by a table write, or "
            "not with the current event's partition")
        assert len(table.sent) == 1, "TrackedSends.send_changelog was bypassed"
    in_app(scenario)


def test_applied_changelog_records_reach_on_applied():
    async def scenario(app):
        table = TrackedGlobalTable(app, name="g", partitions=2, key_type=bytes,
                                   value_type=bytes, **GLOBAL_TABLE)
        seen = []
        table.on_applied = seen.append
        table.apply_changelog_batch(iter([event(app, b"i1", b"Heat", 0, "g-changelog")]))
        assert seen == [[b"i1"]]
        assert table.get(b"i1") == b"Heat", "Collection.apply_changelog_batch no longer applies"
    in_app(scenario)
    source = inspect.getsource(hook("faust.tables.recovery"))
    assert ".apply_changelog_batch(" in source, (
        "Faust hook Collection.apply_changelog_batch is no longer what recovery calls: "
        "TrackedGlobalTable.on_applied would miss other workers' writes")


def test_our_input_queue_can_be_taken_out_of_flow_control():
    async def scenario(app):
        topic = app.topic("behaviors", key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw")
        stream = app.stream(topic)
        queues = getattr(app.flow_control, "_queues", None)
        assert queues is not None, "Faust hook FlowControlEvent._queues is gone (mode)"
        assert stream.channel.queue in queues, (
            "Faust hook FlowControlEvent._queues no longer holds the stream queues it clears")
        queues.discard(stream.channel.queue)
        stream.channel.queue.put_nowait(event(app, b"k", b"v", 0))
        app.flow_control.clear()
        assert stream.channel.queue.qsize() == 1, "FlowControlEvent.clear reached our queue"
        assert hasattr(stream, "enable_acks"), "Faust hook Stream.enable_acks is gone"
    in_app(scenario)


def test_faust_json_writes_event_rows_as_the_lists_stored_before():
    from faust.serializers import codecs
    state = {"events": [EventRow("e", "i", "rate", 1.0, None)]}
    assert codecs.dumps("json", state) == b'{"events":[["e","i","rate",1.0,null]]}', (
        "Faust's json codec no longer writes a NamedTuple as a list: stored UBSP state changes")


def test_the_consumer_attributes_group_member_alive_reads_are_still_there():
    """group_member_alive follows app._consumer._thread._consumer._coordinator._heartbeat_task;
    an upgrade that renames one would silently turn the watchdog's membership check off."""
    from aiokafka.consumer.group_coordinator import GroupCoordinator
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
    assert "self._heartbeat_task = None" in inspect.getsource(GroupCoordinator.__init__)
    assert "self._consumer = " in inspect.getsource(AIOKafkaConsumerThread)
    delegate = hook("faust.transport.consumer.ThreadDelegateConsumer")
    assert "self._thread = " in inspect.getsource(delegate)
    assert "self._coordinator = " in inspect.getsource(hook("aiokafka.AIOKafkaConsumer"))
    assert faust_compat.group_member_alive(SimpleNamespace(_consumer=None)) is None


# --- the bulk lane's hooks ----------------------------------------------------------------------
def test_bulk_consumer_overrides_what_faust_getmany_calls():
    from faust.transport.consumer import Consumer
    theirs = hook("faust.transport.consumer.Consumer._wait_next_records")
    same_parameters(faust_compat.BulkConsumer._wait_next_records, theirs,
                    "Consumer._wait_next_records")
    assert "self._wait_next_records(" in inspect.getsource(Consumer.getmany), (
        "Faust hook Consumer._wait_next_records is no longer how getmany fetches: the bulk "
        "lane would get nothing")
    assert hook("faust.transport.drivers.aiokafka.Transport.Consumer") is hook(
        "faust.transport.drivers.aiokafka.Consumer")
    init = inspect.getsource(Consumer.__init__)
    for name in ("_acked", "_acked_index", "_committed_offset", "_unacked_messages",
                 "_buffered_partitions", "_waiting_for_ack"):
        assert f"self.{name} = " in init, f"Faust hook Consumer.{name} is gone"
    assert "self._n_acked += 1" in inspect.getsource(Consumer.ack), "Consumer._n_acked is gone"
    assert "message.acked" in inspect.getsource(Consumer._clean_unacked_messages), (
        "Faust hook Consumer._clean_unacked_messages no longer reads .acked: InFlight breaks")
    assert "self._unacked_messages" in inspect.getsource(Consumer.wait_empty), (
        "Faust hook Consumer.wait_empty no longer waits on _unacked_messages: a rebalance "
        "would not wait for the lane's batch")
    assert isinstance(hook("faust.streams._current_event"), __import__("contextvars").ContextVar)


def bulk_app(scenario) -> None:
    """`scenario(app, lane, consumer)` on a Faust app whose consumer (made, not started) is the
    bulk lane's (max_pending 1000); tests/streams/test_bulk_lane.py uses it too."""
    from streams.bulk_lane import BulkLane

    async def main():
        app = faust.App("test-bulk", broker="kafka://127.0.0.1:1", store="memory://",
                        web_enabled=False)
        lane = BulkLane({"behaviors"}, max_pending=1000)
        faust_compat.use_bulk_lane(app, lane)
        await scenario(app, lane, app.consumer)

    asyncio.run(main())


def test_acked_ranges_and_in_flight_batches_are_what_faust_commits_and_waits_for():
    from faust.types import TP

    async def scenario(app, lane, consumer):
        assert isinstance(consumer, faust_compat.BulkConsumer), "use_bulk_lane did not apply"
        assert consumer.transport.lane is lane, "Faust hook Consumer.transport is gone"
        tp = TP("behaviors", 0)
        token = faust_compat.InFlight(consumer)
        assert token in consumer._unacked_messages
        assert faust_compat.ack_range(consumer, tp, 0, 9) == 10
        assert faust_compat.ack_range(consumer, tp, 5, 12) == 3   # 5..9 were acked already
        token.done(consumer)
        consumer._clean_unacked_messages()
        assert not consumer._unacked_messages
        assert consumer._new_offset(tp) == 13, (
            "Faust hook Consumer._acked/_acked_index: the offsets ack_range acked are not "
            "the ones Faust commits")
    bulk_app(scenario)


def test_file_under_files_table_writes_outside_a_stream(monkeypatch):
    from streams.bulk_lane import LaneEvent
    sent = []

    def fake_send_changelog(self, partition, key, value, key_serializer=None,
                            value_serializer=None):
        sent.append(key)
        return SimpleNamespace(message=SimpleNamespace(partition=1))

    monkeypatch.setattr(faust.tables.base.Collection, "send_changelog", fake_send_changelog)

    async def scenario(app):
        table = TrackedTable(app, name="t", partitions=2, key_type=bytes, use_partitioner=True)
        record = SimpleNamespace(topic="behaviors", partition=1, offset=7, key=b"k", value=b"v")
        event = LaneEvent(record)  # Faust holds the current event by a weak reference
        with faust_compat.file_under() as file:
            file(event)
            assert faust.streams.current_event().message is record
            table[b"k"] = {"seq": 1}
        assert faust.streams.current_event() is None, "file_under did not restore the event"
        assert sent == [b"k"] and table[b"k"] == {"seq": 1}
    in_app(scenario)


def test_coordinator_errors_thread_replaces_the_thread_faust_makes_and_reads_what_it_reads():
    """CoordinatorErrorsThread replaces Faust's consumer thread and reads aiokafka's pending
    coordinator errors; an upgrade that renames a hook would bring back the consumer that
    never joins its group again after a failed join."""
    from aiokafka.consumer.group_coordinator import GroupCoordinator
    theirs = hook("faust.transport.drivers.aiokafka.Consumer._new_consumer_thread")
    same_parameters(faust_compat.BulkConsumer._new_consumer_thread, theirs,
                    "Consumer._new_consumer_thread")
    assert issubclass(faust_compat.CoordinatorErrorsThread,
                      hook("faust.transport.drivers.aiokafka.AIOKafkaConsumerThread"))
    assert "self._coordination_task = " in inspect.getsource(GroupCoordinator)
    assert "self._pending_exception" in inspect.getsource(GroupCoordinator.check_errors)
    assert "self._client = " in inspect.getsource(hook("aiokafka.AIOKafkaConsumer"))
    hook("aiokafka.AIOKafkaClient.force_metadata_update")
