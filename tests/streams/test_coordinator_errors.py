"""streams/faust_compat.CoordinatorErrorsThread through the real broker: a join of the group
whose assignment failed is retried, instead of leaving the consumer outside its group for good
(the first start of a worker on a new three-node cluster, where Faust's assignor raised for a
global table's changelog the metadata did not list yet)."""
from __future__ import annotations

import asyncio
import time
import uuid

import faust
from kafka.admin import NewTopic

from core.kafka import make_admin
from streams import faust_compat
from streams.bulk_lane import BulkLane
from tests.conftest import base_settings

ASSIGNED_WITHIN_S = 60.0  # a retried join takes a few seconds; without the retry: never


def test_a_join_whose_assignment_raised_is_retried_until_partitions_are_assigned(kafka, tmp_path):
    name = f"rejoin-{uuid.uuid4().hex[:8]}"
    admin = make_admin(base_settings(bootstrap_servers=kafka.bootstrap))
    try:
        admin.create_topics([NewTopic(name, 2, 1)])
    finally:
        admin.close()
    failed = []

    async def main() -> set:
        app = faust.App(name, broker=f"kafka://{kafka.bootstrap}", store="memory://",
                        web_enabled=False, datadir=str(tmp_path), topic_replication_factor=1)
        faust_compat.use_bulk_lane(app, BulkLane({f"{name}-unused"}, max_pending=10))

        @app.agent(app.topic(name))
        async def drain(stream):
            async for _ in stream:
                pass

        assign = app.assignor.assign

        def fails_first(cluster, member_metadata):
            if not failed:
                failed.append(True)
                raise KeyError("a changelog missing from the leader's metadata")
            return assign(cluster, member_metadata)

        app.assignor.assign = fails_first  # the instance aiokafka's coordinator calls
        await app.start()
        try:
            deadline = time.monotonic() + ASSIGNED_WITHIN_S
            while not app.consumer.assignment() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            return {tp.topic for tp in app.consumer.assignment()}
        finally:
            await asyncio.wait_for(app.stop(), 30)  # a consumer outside its group stops slowly

    assigned = asyncio.run(main())
    assert failed, "the first assignment did not run through the failing assignor"
    assert name in assigned, (f"no partition of {name} assigned {ASSIGNED_WITHIN_S:.0f} s after "
                              f"a failed assignment: the consumer never joined again")
