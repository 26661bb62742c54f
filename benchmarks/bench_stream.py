"""`liber bench stream`: stream-worker throughput against Faust's floor and a bare consumer, in
one run, with the drift rule off and on.

Starts its own local broker and
1. loads the catalogue (`items`) into one worker per configuration, drift off and on, and stops
   it: a running deployment has its item texts and, with drift, their vectors (encoding
   ML-1M's 3,883 titles is reported apart, `catalogue_seconds`);
2. replays the MovieLens ratings into `behaviors`;
3. reads the whole topic with a bare aiokafka consumer (the client Faust uses), no processing:
   the ceiling on this machine;
4. runs a Faust agent that only batches and acks (benchmarks/faust_floor.py): what Faust's
   per-event path costs before any processing;
5. restarts each configuration's `liber worker` on its state and times it from its first to
   its last event (read from its Prometheus metrics), with its peak RSS and CPU seconds.
Prints one JSON object; the top-level figures are drift off's, `drift_on` holds the same for
drift on. CPU seconds per event are the robust figure on a shared machine. The broker, the
workers and the temporary directory do not outlive the run, even one ended by SIGTERM or
SIGKILL (ops/local_kafka.py).
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


def _start_worker(settings: Settings, log_path: Path):
    port = free_port()
    env = {**os.environ, **settings.replace(metrics_port=port, log_level="WARNING").to_env()}
    with open(log_path, "ab") as worker_log:
        proc = popen_bound([sys.executable, "-m", "liber.cli", "worker"], env=env,
                           stdout=worker_log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}/metrics"


def _stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _metric(url: str, name: str) -> float:
    try:
        return scrape(url, name)
    except OSError:
        return 0.0


def _load_catalogue(settings: Settings, items: int, log_path: Path, timeout: float) -> float:
    """Seconds for a worker to store the catalogue (and, with drift, every item's vector)."""
    proc, url = _start_worker(settings, log_path)
    start, deadline = time.perf_counter(), time.monotonic() + timeout
    try:
        while _metric(url, "liber_items_loaded_total") < items or (
                settings.drift_threshold > 0 and _metric(url, "liber_item_vectors") < items):
            if proc.poll() is not None:
                raise RuntimeError(f"worker stopped while loading the catalogue; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"catalogue not loaded after {timeout:.0f}s; see {log_path}")
            time.sleep(0.5)
        return time.perf_counter() - start
    finally:
        _stop(proc)


def _time_worker(settings: Settings, total: int, log_path: Path, timeout: float,
                 log=print) -> dict:
    proc, url = _start_worker(settings, log_path)
    try:
        first = last = None
        seen, deadline = 0.0, time.monotonic() + timeout
        while seen < total:
            if proc.poll() is not None:
                raise RuntimeError(f"worker stopped at {seen}/{total}; see {log_path}")
            if time.monotonic() > deadline:  # report the rate so far rather than nothing
                log(f"timed out after {timeout:.0f}s at {seen:.0f}/{total} events")
                break
            seen = _metric(url, "liber_events_in_total")
            now = time.perf_counter()
            if seen > 0 and first is None:
                first = (now, seen, _cpu_s(proc.pid))
            last = (now, _cpu_s(proc.pid))
            time.sleep(0.5)  # each scrape costs the worker CPU (the state-size walk)
        # Events counted at the first sample arrived before it: count from that sample on.
        elapsed = last[0] - first[0] if first else 0.0
        cpu = last[1] - first[2] if first else 0.0
        # None when every event came before the first sample (a run too short to time)
        rate = round((seen - first[1]) / elapsed) if elapsed > 0 and seen > first[1] else None
        return {"events_per_s": rate, "worker_seconds": round(elapsed, 1),
                "cpu_s": round(cpu, 1), "events_processed": int(seen),
                "events_per_cpu_s": round((seen - first[1]) / cpu) if rate and cpu > 0 else None,
                "complete": seen >= total,
                "partitions_closed": int(scrape(url, "liber_partitions_closed_total")),
                "dead_lettered": int(scrape(url, "liber_dead_lettered_total")),
                "peak_rss_mb": round(_peak_rss_mb(proc.pid), 1)}
    finally:
        _stop(proc)


def _ratio(rate, other: float, digits: int = 2):
    return round(rate / other, digits) if rate else None


DRIFT_ON = 0.55  # the setting's default, used for the drift-on worker when drift is off here


def run(settings: Settings, dataset: str = "ml-1m", limit: int | None = None,
        timeout: float = 3600.0, log=print) -> dict:
    scratch = Scratch("liber-bench-stream-")
    work = scratch.path
    broker = LocalKafka(settings.home, work / "kafka", port=free_port())
    settings = settings.replace(bootstrap_servers=broker.bootstrap, state_dir=str(work / "state"),
                                app_id="liber-bench", topic_prefix="bench.")
    workers = {"drift_off": settings.replace(app_id="liber-bench-drift-off", drift_threshold=0.0),
               "drift_on": settings.replace(app_id="liber-bench-drift-on",
                                            drift_threshold=settings.drift_threshold or DRIFT_ON)}
    try:
        broker.start(log=log)
        create_topics(settings, log=lambda m: None)
        catalogue = replay(settings, dataset, events=False, progress=False, log=log)
        catalogue_s = {}
        for name, config in workers.items():
            log(f"{name}: loading the catalogue ({catalogue.items} items) ...")
            catalogue_s[name] = round(_load_catalogue(config, catalogue.items,
                                                      work / f"{name}.log", timeout), 1)
        produced = replay(settings, dataset, limit=limit, items=False, progress=False, log=log)
        log(f"bare consumer: reading {produced.events} events ...")
        raw_seconds = asyncio.run(_bare_consume(settings, produced.events))
        log(f"faust floor: an agent that only batches and acks {produced.events} events ...")
        floor = _faust_floor(settings, produced.events, work / "floor.json", timeout)
        timed = {}
        for name, config in workers.items():
            log(f"{name}: processing {produced.events} events ...")
            timed[name] = _time_worker(config, produced.events, work / f"{name}.log", timeout,
                                       log)
            timed[name]["catalogue_seconds"] = catalogue_s[name]
        raw_rate = produced.events / raw_seconds
        floor_rate = floor["events"] / floor["seconds"]
        off, on = timed["drift_off"], timed["drift_on"]
        return {"benchmark": "stream", "dataset": dataset, "events": produced.events,
                "events_per_s": off["events_per_s"],
                "faust_floor_events_per_s": round(floor_rate),
                "faust_floor_events_per_cpu_s": round(floor["events"] / floor["cpu_s"]),
                "raw_consumer_events_per_s": round(raw_rate),
                "vs_faust_floor": _ratio(off["events_per_s"], floor_rate),
                "ratio": _ratio(off["events_per_s"], raw_rate, 3),
                **{k: off[k] for k in ("events_per_cpu_s", "cpu_s", "complete", "worker_seconds",
                                       "partitions_closed", "dead_lettered", "peak_rss_mb",
                                       "catalogue_seconds")},
                "drift_on": {**on, "vs_faust_floor": _ratio(on["events_per_s"], floor_rate),
                             "drift_threshold": workers["drift_on"].drift_threshold},
                "catalogue_items": catalogue.items,
                "produce_events_per_s": round(produced.events / produced.seconds),
                "topic_partitions": settings.topic_partitions,
                "batch_size": settings.batch_size,
                "load_avg_1m": round(os.getloadavg()[0], 2), "machine": machine.describe()}
    finally:
        broker.stop(log=log)
        scratch.close()
