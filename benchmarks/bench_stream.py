"""`liber bench stream`: stream-worker throughput against a bare consumer, in one run.

Starts its own local broker, replays a MovieLens dataset into `behaviors`, then
1. reads the whole topic with a bare aiokafka consumer (the client Faust uses), no processing:
   the ceiling on this machine;
2. runs a Faust agent that only batches and acks (benchmarks/faust_floor.py): what Faust's
   per-event path costs before any processing;
3. runs `liber worker` as a separate process from an empty state and times it from its first
   to its last event (read from its Prometheus metrics), with its peak RSS and CPU seconds.
Prints one JSON object. CPU seconds per event are the robust figure on a shared machine.
The broker, the workers and the temporary directory do not outlive the run, even one ended by
SIGTERM or SIGKILL (ops/local_kafka.py).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core import machine
from core.settings import Settings
from ops.local_kafka import LocalKafka, Scratch, free_port, popen_bound, run_bound
from ops.metrics import scrape
from streams.replay import replay
from core.topics import BEHAVIORS, create_topics


async def _bare_consume(settings: Settings, total: int) -> float:
    """Seconds for a bare consumer to read `total` records, first record to last."""
    from aiokafka import AIOKafkaConsumer

    from core.kafka import aiokafka_security_options
    consumer = AIOKafkaConsumer(settings.topic(BEHAVIORS),
                                bootstrap_servers=settings.bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=None, max_partition_fetch_bytes=4 * 1024 * 1024,
                                **aiokafka_security_options(settings))
    await consumer.start()
    try:
        seen, start = 0, None
        while seen < total:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batches.values():
                if start is None and records:
                    start = time.perf_counter()
                seen += len(records)
        return time.perf_counter() - start
    finally:
        await consumer.stop()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _faust_floor(settings: Settings, total: int, out: Path, timeout: float) -> dict:
    env = {**os.environ, **settings.replace(app_id="liber-bench-floor").to_env()}
    proc = run_bound([sys.executable, "-m", "benchmarks.faust_floor", str(total), str(out)],
                     env=env, capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        raise RuntimeError(f"faust floor failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _time_worker(settings: Settings, total: int, log_path: Path, timeout: float,
                 log=print) -> dict:
    port = free_port()
    env = {**os.environ, **settings.replace(metrics_port=port, log_level="WARNING").to_env()}
    with open(log_path, "wb") as worker_log:
        proc = popen_bound([sys.executable, "-m", "liber.cli", "worker"], env=env,
                           stdout=worker_log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        first = last = None
        seen, deadline = 0.0, time.monotonic() + timeout
        while seen < total:
            if proc.poll() is not None:
                raise RuntimeError(f"worker stopped at {seen}/{total}; see {log_path}")
            if time.monotonic() > deadline:  # report the rate so far rather than nothing
                log(f"timed out after {timeout:.0f}s at {seen:.0f}/{total} events")
                break
            try:
                seen = scrape(url, "liber_events_in_total")
            except OSError:
                seen = 0.0
            now = time.perf_counter()
            if seen > 0 and first is None:
                first = (now, seen, _cpu_s(proc.pid))
            last = (now, _cpu_s(proc.pid))
            time.sleep(0.5)  # each scrape costs the worker CPU (the state-size walk)
        # Events counted at the first sample arrived before it: count from that sample on.
        elapsed = last[0] - first[0] if first else 0.0
        cpu = last[1] - first[2] if first else 0.0
        rate = (seen - first[1]) / elapsed if elapsed > 0 else float("nan")
        return {"events_per_s": rate, "worker_seconds": elapsed, "events_processed": int(seen),
                "events_per_cpu_s": (seen - first[1]) / cpu if cpu > 0 else float("nan"),
                "partitions_closed": int(scrape(url, "liber_partitions_closed_total")),
                "dead_lettered": int(scrape(url, "liber_dead_lettered_total")),
                "peak_rss_mb": round(_peak_rss_mb(proc.pid), 1)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(settings: Settings, dataset: str = "ml-1m", limit: int | None = None,
        timeout: float = 3600.0, log=print) -> dict:
    scratch = Scratch("liber-bench-stream-")
    work = scratch.path
    broker = LocalKafka(settings.home, work / "kafka", port=free_port())
    settings = settings.replace(bootstrap_servers=broker.bootstrap, state_dir=str(work / "state"),
                                app_id="liber-bench", topic_prefix="bench.")
    try:
        broker.start(log=log)
        create_topics(settings, log=lambda m: None)
        produced = replay(settings, dataset, limit=limit, progress=False, log=log)
        log(f"bare consumer: reading {produced.events} events ...")
        raw_seconds = asyncio.run(_bare_consume(settings, produced.events))
        log(f"faust floor: an agent that only batches and acks {produced.events} events ...")
        floor = _faust_floor(settings, produced.events, work / "floor.json", timeout)
        log(f"stream worker: processing {produced.events} events ...")
        worker = _time_worker(settings, produced.events, work / "worker.log", timeout, log)
        raw_rate = produced.events / raw_seconds
        return {"benchmark": "stream", "dataset": dataset, "events": produced.events,
                "events_per_s": round(worker["events_per_s"]),
                "raw_consumer_events_per_s": round(raw_rate),
                "ratio": round(worker["events_per_s"] / raw_rate, 3),
                "events_per_cpu_s": round(worker["events_per_cpu_s"]),
                "faust_floor_events_per_s": round(floor["events"] / floor["seconds"]),
                "faust_floor_events_per_cpu_s": round(floor["events"] / floor["cpu_s"]),
                "complete": worker["events_processed"] >= produced.events,
                "worker_seconds": round(worker["worker_seconds"], 1),
                "partitions_closed": worker["partitions_closed"],
                "dead_lettered": worker["dead_lettered"],
                "peak_rss_mb": worker["peak_rss_mb"],
                "produce_events_per_s": round(produced.events / produced.seconds),
                "topic_partitions": settings.topic_partitions,
                "batch_size": settings.batch_size, "drift": settings.drift_threshold > 0,
                "load_avg_1m": round(os.getloadavg()[0], 2), "machine": machine.describe()}
    finally:
        broker.stop(log=log)
        scratch.close()
