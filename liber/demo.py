"""`liber demo`: the whole pipeline on this machine, from an empty broker to printed results.

Starts a fresh local Kafka broker, creates the topics, runs the stream worker as its own
process, replays MovieLens into Kafka, waits until every event is accounted for (read from
the worker's Prometheus metrics), then prints what the pipeline produced for a few users.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from liber.settings import Settings
from ops.local_kafka import LocalKafka, free_port
from ops.metrics import scrape
from streams.records import ClosedPartition, InvalidRecord, decode
from streams.replay import replay
from streams.topics import PARTITIONS_CLOSED, create_topics


def _metric(port: int, name: str, **labels: str) -> float:
    return scrape(f"http://127.0.0.1:{port}/metrics", name, **labels)


def _wait_accounted(port: int, expected: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline, last = time.monotonic() + timeout, -1.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"stream worker exited with {proc.returncode}")
        try:
            seen = _metric(port, "liber_events_in_total")
        except OSError:
            seen = 0.0
        if seen != last:
            print(f"  stream worker: {int(seen)}/{expected} events in", flush=True)
            last = seen
        if seen >= expected:
            return
        time.sleep(2)
    raise TimeoutError(f"only {last} of {expected} events reached the worker in {timeout}s")


def run_demo(settings: Settings, dataset: str = "ml-100k", users: int | None = None,
             show: int = 3) -> int:
    demo_dir = Path(settings.home) / "demo"
    shutil.rmtree(demo_dir, ignore_errors=True)  # every demo starts from an empty broker
    broker = LocalKafka(settings.home, demo_dir / "kafka", port=free_port())
    metrics_port = free_port()
    settings = settings.replace(bootstrap_servers=broker.bootstrap,
                                state_dir=str(demo_dir / "state"), metrics_port=metrics_port)
    print(f"== 1/4 local Kafka broker ({broker.bootstrap}, data in {broker.data_dir})")
    broker.start()
    worker = None
    try:
        create_topics(settings)
        print("== 2/4 stream worker (UBSP on RocksDB state), its own process")
        env = {**os.environ, **settings.to_env(), "LIBER_LOG_LEVEL": "WARNING"}
        log = open(demo_dir / "stream-worker.log", "wb")
        worker = subprocess.Popen([sys.executable, "-m", "liber.cli", "worker"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        print(f"== 3/4 replay {dataset} into Kafka")
        result = replay(settings, dataset, users=users)
        _wait_accounted(metrics_port, result.events, worker, timeout=600)
        print("== 4/4 results")
        _print_results(settings, metrics_port, show)
        return 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        broker.stop()


def _print_results(settings: Settings, metrics_port: int, show: int) -> None:
    from kafka import KafkaConsumer, TopicPartition
    name = settings.topic(PARTITIONS_CLOSED)
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                             enable_auto_commit=False)
    parts = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or ()]
    consumer.assign(parts)
    consumer.seek_to_beginning()
    end = consumer.end_offsets(parts)
    by_user: dict[str, list[ClosedPartition]] = defaultdict(list)
    while any(consumer.position(tp) < end[tp] for tp in parts):
        for records in consumer.poll(timeout_ms=500).values():
            for record in records:
                try:
                    part = decode(ClosedPartition, record.value, key=record.key)
                except InvalidRecord:
                    continue
                by_user[part.user_id].append(part)
    consumer.close()
    total = sum(len(v) for v in by_user.values())
    rules = {r: int(_metric(metrics_port, "liber_partitions_closed_total", rule=r))
             for r in ("max_events", "max_gap", "max_span")}
    print(f"partitions closed: {total} for {len(by_user)} users; by rule: {rules}")
    print(f"dead-lettered: {int(_metric(metrics_port, 'liber_dead_lettered_total'))}")
    for user in sorted(by_user, key=lambda u: -len(by_user[u]))[:show]:
        print(f"\nuser {user}: {len(by_user[user])} partitions")
        for part in sorted(by_user[user], key=lambda p: p.seq)[:4]:
            start = dt.datetime.fromtimestamp(part.start_ts, dt.timezone.utc)
            titles = "; ".join(e.text for e in part.events[:3])
            print(f"  seq {part.seq}: {len(part.events)} events from {start:%Y-%m-%d %H:%M}, "
                  f"closed by {part.reason}: {titles} ...")
