"""What Faust alone costs here: an agent that reads `behaviors` like the UBSP agent (raw bytes,
the same `batches()` and acks) and does nothing else. `liber bench stream` runs it in the same
run as the real worker, so the gap between the two is what our processing costs, and the gap
between this and the bare consumer is what Faust's per-event path costs.

    python -m benchmarks.faust_floor TOTAL OUT.json      (settings from LIBER_* variables)

writes one JSON object: events, seconds (first event to last), cpu_s (this process).
"""
from __future__ import annotations

import json
import os
import sys
import time

from core.settings import Settings
from core.topics import BEHAVIORS


def run(settings: Settings, total: int, out: str) -> None:
    import faust

    from streams.app import consuming_options
    from streams.faust_compat import ack_all, batches

    settings.state_path.mkdir(parents=True, exist_ok=True)
    app = faust.App(f"{settings.app_id}-floor", datadir=str(settings.state_path / "faust-floor"),
                    **consuming_options(settings))
    topic = app.topic(settings.topic(BEHAVIORS), key_type=bytes, value_type=bytes,
                      key_serializer="raw", value_serializer="raw")
    seen = {"events": 0, "first": None, "cpu0": None}

    @app.agent(topic)
    async def count(stream):
        async for batch in batches(stream, settings.batch_size):
            if seen["first"] is None:
                seen["first"], seen["cpu0"] = time.perf_counter(), time.process_time()
            seen["events"] += len(batch)
            await ack_all(stream, batch)
            if seen["events"] >= total:
                result = {"events": seen["events"],
                          "seconds": time.perf_counter() - seen["first"],
                          "cpu_s": time.process_time() - seen["cpu0"]}
                with open(out, "w") as fh:
                    json.dump(result, fh)
                os._exit(0)  # done: no clean Faust shutdown needed for a measurement

    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    run(Settings.load(), int(sys.argv[1]), sys.argv[2])
