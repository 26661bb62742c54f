"""The stream worker's batching over a real Faust stream (no broker needed: events are put
into the stream's input queue the way Faust's conductor does)."""
from __future__ import annotations

import asyncio

import faust
from faust.types.tuples import Message

from streams.faust_compat import ack_all, batches


def run(scenario) -> None:
    async def main():
        app = faust.App("test-batches", broker="kafka://127.0.0.1:1", store="memory://",
                        web_enabled=False)
        topic = app.topic("behaviors", key_type=bytes, value_type=bytes,
                          key_serializer="raw", value_serializer="raw")
        stream = app.stream(topic)
        app.flow_control.resume()  # as when the worker's first recovery is done

        def deliver(offset: int, partition: int = 0) -> None:
            value = b"v%d" % offset
            message = Message(topic.get_topic_name(), partition, offset, 0.0, 0, [], b"k",
                              value, None, generation_id=app.consumer_generation_id)
            message.refcount = 1
            stream.channel.queue.put_nowait(faust.Event(app, b"k", value, [], message))

        taken = batches(stream, 100, wait_s=0.05)
        try:
            await scenario(app, stream, deliver, taken)
        finally:
            await taken.aclose()

    asyncio.run(main())


def offsets(events) -> list[int]:
    return [e.message.offset for e in events]


def test_records_waiting_in_the_stream_survive_a_flow_control_resume():
    """Faust resumes flow control when a table recovery completes, after it has already
    resumed fetching from the committed offsets; the resume used to clear the stream's
    queue, and the records fetched in between were never seen again (one event
    missing under load)."""
    async def scenario(app, stream, deliver, taken):
        for offset in range(3):
            deliver(offset)
        first = await taken.__anext__()
        for offset in range(3, 6):
            deliver(offset)
        app.flow_control.resume()
        second = await taken.__anext__()
        assert offsets(first) + offsets(second) == list(range(6))
        await ack_all(stream, first)
        await ack_all(stream, second)
        assert all(e.message.acked for e in [*first, *second])

    run(scenario)


def test_a_record_delivered_twice_is_processed_once_and_acked_twice():
    """After a seek back to the committed offset Faust can deliver a record again in the same
    run; the copy is acked with the batch, never processed a second time."""
    async def scenario(app, stream, deliver, taken):
        for offset in (0, 1, 2):
            deliver(offset)
        deliver(0, partition=1)  # same offset, another partition: a different record
        first = await taken.__anext__()
        for offset in (1, 2, 3):
            deliver(offset)
        second = await taken.__anext__()
        assert [(e.message.partition, e.message.offset) for e in first] == [
            (0, 0), (0, 1), (0, 2), (1, 0)]
        assert offsets(second) == [3] and offsets(second.copies) == [1, 2]
        await ack_all(stream, second)
        assert all(e.message.acked for e in [*second, *second.copies])

    run(scenario)
