"""`liber bench stream`, tiny: the worker with drift off and on, Faust's floor and a bare
consumer on the same topic, in one run; every event processed and nothing dead-lettered."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_stream_times_both_workers_against_the_floors():
    cmd = [sys.executable, "-m", "liber.cli", "bench", "stream", "--dataset", "ml-100k",
           "--limit", "60000", "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIBER_") or k == "LIBER_HOME"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                            env={**env, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["events"] == 60000 and report["catalogue_items"] == 1682
    for row in (report, report["drift_on"]):
        assert row["complete"] and row["dead_lettered"] == 0 and row["catalogue_seconds"] > 0
        assert row["peak_rss_mb"] > 0
        # a rate needs two samples of the worker's metrics (0.5 s apart): None when too quick
        assert row["events_per_s"] is None or row["events_per_s"] > 0 and row["cpu_s"] > 0
    assert report["drift_on"]["drift_threshold"] > 0
    assert report["faust_floor_events_per_s"] > 0 and report["raw_consumer_events_per_s"] > 0
    # the same events, cut by more rules with drift on
    assert report["drift_on"]["partitions_closed"] >= report["partitions_closed"] > 0
