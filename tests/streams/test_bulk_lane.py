"""The bulk lane on a real (not started) Faust consumer: batches in fetch order up to a size,
records of an older generation dropped, records handed out twice acked but not processed,
each partition's offsets acked in one range once the batch is done (gaps between fetches
included), and the batch counted as in flight until then."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from faust.types import TP

from tests.streams.test_faust_compat import bulk_app

TP0, TP1 = TP("behaviors", 0), TP("behaviors", 1)


def records(tp, first: int, last: int) -> list:
    return [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=o, key=b"u",
                            value=b"{}") for o in range(first, last + 1)]


def run(scenario) -> None:
    async def taking(app, lane, consumer):
        consumer.flow_active = True  # as once Faust's consumer has started
        await scenario(app, lane, consumer, lane.batches(app, max_events=8, wait_s=0.01))

    bulk_app(taking)


def offsets(batch) -> list[tuple[int, int]]:
    return [(e.message.partition, e.message.offset) for e in batch.events]


def test_batches_keep_fetch_order_drop_old_generations_and_ack_in_ranges():
    async def scenario(app, lane, consumer, batches):
        generation = app.consumer_generation_id
        await lane.put(consumer, TP0, records(TP0, 0, 5), generation)
        await lane.put(consumer, TP1, records(TP1, 0, 3), generation - 1)  # before a rebalance
        await lane.put(consumer, TP1, records(TP1, 10, 13), generation)
        first = await batches.__anext__()
        assert offsets(first) == [(0, o) for o in range(6)] + [(1, 10), (1, 11)]  # split at 8
        assert first.in_flight in consumer._unacked_messages
        second = await batches.__anext__()
        assert offsets(second) == [(1, 12), (1, 13)]
        lane.ack(first)
        lane.ack(second)
        assert not consumer._unacked_messages
        assert (consumer._new_offset(TP0), consumer._new_offset(TP1)) == (6, 14)

    run(scenario)


def test_a_record_handed_out_twice_is_acked_not_processed_and_gaps_are_acked():
    async def scenario(app, lane, consumer, batches):
        generation = app.consumer_generation_id
        await lane.put(consumer, TP0, records(TP0, 0, 3), generation)
        lane.ack(await batches.__anext__())
        # the same offsets again (fetched twice in one generation), then a gap 6..7
        await lane.put(consumer, TP0, records(TP0, 2, 5) + records(TP0, 8, 9), generation)
        again = await batches.__anext__()
        assert again.copies == 2 and offsets(again) == [(0, 4), (0, 5), (0, 8), (0, 9)]
        lane.ack(again)
        assert consumer._new_offset(TP0) == 10
        # after a rebalance the same offsets are processed again (recovery seeks back)
        app.consumer_generation_id = generation + 1
        await lane.put(consumer, TP0, records(TP0, 8, 9), generation + 1)
        assert offsets(await batches.__anext__()) == [(0, 8), (0, 9)]

    run(scenario)


def test_no_batch_is_taken_while_faust_has_stopped_the_flow():
    async def scenario(app, lane, consumer, batches):
        await lane.put(consumer, TP0, records(TP0, 0, 1), app.consumer_generation_id)
        consumer.flow_active = False
        taking = asyncio.ensure_future(batches.__anext__())
        await asyncio.sleep(0.2)
        assert not taking.done()
        consumer.flow_active = True
        assert offsets(await asyncio.wait_for(taking, 5)) == [(0, 0), (0, 1)]

    run(scenario)
