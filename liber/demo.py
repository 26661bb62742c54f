"""`liber demo`: the whole pipeline on this machine, from an empty broker to printed results.

Starts a fresh local Kafka broker, creates the topics, runs the stream worker and the LLM
worker as their own processes, replays the first users of MovieLens into Kafka, waits until
every event and every closed partition is accounted for (read from the workers' Prometheus
metrics), then prints each shown user's partitions and cascaded interest summaries. Last, the
fusion worker's vectors: one user's ranked list (example ranker, liber/demo_interests.py)
before and after the user's next events close a partition and change their vector.
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

from core.kafka import iter_to_end
from core.settings import Settings
from ops.local_kafka import LocalKafka, free_port
from ops.metrics import scrape
from core.records import ClosedPartition, InvalidRecord, Summary, decode
from streams.replay import replay
from core.topics import PARTITIONS_CLOSED, SUMMARIES, create_topics


class Process:
    """A `liber` subcommand in its own process, with its own metrics port and log file."""

    def __init__(self, command: str, settings: Settings, log_dir: Path):
        self.command, self.port = command, free_port()
        env = {**os.environ, **settings.replace(metrics_port=self.port).to_env(),
               "LIBER_LOG_LEVEL": "WARNING"}
        self.log_path = log_dir / f"{command}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "liber.cli", command], env=env,
                                         stdout=log, stderr=subprocess.STDOUT)

    def metric(self, name: str, **labels: str) -> float:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.command} exited with {self.proc.returncode}; "
                               f"see {self.log_path}")
        try:
            return scrape(f"http://127.0.0.1:{self.port}/metrics", name, **labels)
        except OSError:  # not listening yet
            return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _wait(what: str, current, target: float, timeout: float) -> None:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = current()
        if value != last:
            print(f"  {what}: {int(value)}/{int(target)}", flush=True)
            last = value
        if value >= target:
            return
        time.sleep(2)
    raise TimeoutError(f"{what}: only {last} of {target} after {timeout:.0f}s")


def run_demo(settings: Settings, dataset: str = "ml-100k", users: int | None = 5,
             per_user: int | None = 40, show: int = 3) -> int:
    demo_dir = Path(settings.home) / "demo"
    shutil.rmtree(demo_dir, ignore_errors=True)  # every demo starts from an empty broker
    demo_dir.mkdir(parents=True)
    broker = LocalKafka(settings.home, demo_dir / "kafka", port=free_port())
    settings = settings.replace(bootstrap_servers=broker.bootstrap,
                                state_dir=str(demo_dir / "state"))
    print(f"== 1/6 local Kafka broker ({broker.bootstrap}, data in {broker.data_dir})")
    broker.start()
    workers: list[Process] = []
    try:
        create_topics(settings)
        print("== 2/6 stream worker (UBSP, RocksDB state), LLM worker (UIL, "
              "SmolLM2-135M-Instruct on CPU) and fusion worker (UIF), each its own process; "
              "logs in", demo_dir)
        from liber.demo_interests import demo_artifact, show_before_after
        artifact = demo_artifact(settings, dataset)
        stream, llm = Process("worker", settings, demo_dir), Process("llm-worker", settings, demo_dir)
        fusion = Process("fusion-worker", settings.replace(fusion_model_dir=str(artifact)),
                         demo_dir)
        workers += [stream, llm, fusion]
        print(f"== 3/6 replay {dataset}" + (f", first {users} users" if users else "")
              + (f", each user's first {per_user} events" if per_user else ""))
        catalogue = replay(settings, dataset, events=False)
        # Item text is joined when a partition closes: let the catalogue land first.
        _wait("stream worker, catalogue items loaded",
              lambda: stream.metric("liber_items_loaded_total"), catalogue.items, timeout=300)
        result = replay(settings, dataset, users=users, per_user=per_user, items=False)
        print("== 4/6 waiting for the pipeline")
        _wait("stream worker, events in", lambda: stream.metric("liber_events_in_total"),
              result.events, timeout=600)
        closed = stream.metric("liber_partitions_closed_total")
        _wait("LLM worker, partitions summarised or dead-lettered",
              lambda: llm.metric("liber_llm_summaries_total")
              + llm.metric("liber_llm_dead_lettered_total"), closed, timeout=1800)
        _wait("fusion worker, summaries read", lambda: fusion.metric(
            "liber_fusion_records_in_total", topic="summaries"),
            llm.metric("liber_llm_summaries_total"), timeout=600)
        print("== 5/6 results")
        users_by_partitions = _print_results(settings, stream, llm, show)
        print("\n== 6/6 ranking with the user's interest vector (user-interests -> ranker "
              "cache -> CTR model)")
        show_before_after(settings, dataset, users_by_partitions, per_user, artifact)
        return 0
    finally:
        for worker in workers:
            worker.stop()
        broker.stop()


def _read(settings: Settings, topic: str, record_type) -> dict[str, list]:
    """Every valid record of a topic, by user (deduplicated on (user_id, seq))."""
    by_key: dict[tuple[str, int], object] = {}
    for record in iter_to_end(settings, settings.topic(topic), timeout=None, max_records=500):
        try:
            rec = decode(record_type, record.value, key=record.key)
        except InvalidRecord:
            continue
        by_key[(rec.user_id, rec.seq)] = rec
    by_user: dict[str, list] = defaultdict(list)
    for (user, _), rec in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        by_user[user].append(rec)
    return by_user


def _print_results(settings: Settings, stream: Process, llm: Process, show: int) -> list[str]:
    partitions = _read(settings, PARTITIONS_CLOSED, ClosedPartition)
    summaries = _read(settings, SUMMARIES, Summary)
    rules = {r: int(stream.metric("liber_partitions_closed_total", rule=r))
             for r in ("max_events", "max_gap", "max_span")}
    tokens_in = int(llm.metric("liber_llm_tokens_in_total"))
    tokens_out = int(llm.metric("liber_llm_tokens_out_total"))
    print(f"events: {int(stream.metric('liber_events_in_total'))}, dead-lettered: "
          f"{int(stream.metric('liber_dead_lettered_total'))}")
    print(f"partitions closed: {sum(map(len, partitions.values()))} for {len(partitions)} "
          f"users, by rule {rules}")
    print(f"summaries: {sum(map(len, summaries.values()))}; LLM tokens in {tokens_in}, "
          f"out {tokens_out}, model seconds {llm.metric('liber_llm_model_seconds_total'):.0f}")
    users = sorted(partitions, key=lambda u: -len(partitions[u]))
    for user in users[:show]:
        print(f"\nuser {user}: {len(partitions[user])} partitions")
        by_seq = {s.seq: s for s in summaries.get(user, [])}
        for part in partitions[user]:
            start = dt.datetime.fromtimestamp(part.start_ts, dt.timezone.utc)
            titles = "; ".join(e.text for e in part.events[:2])
            print(f"  seq {part.seq}: {len(part.events)} events from {start:%Y-%m-%d %H:%M} "
                  f"({part.reason}): {titles} ...")
            summary = by_seq.get(part.seq)
            if summary:
                print(f"    summary: {summary.partition_summary}")
                if summary.shift:   # the default template asks for no shift line
                    print(f"    shift:   {summary.shift}")
        last = max(by_seq.values(), key=lambda s: s.seq, default=None)
        if last:
            print(f"  cascaded interest profile after seq {last.seq}: {last.cascaded_summary}")
    return users  # most partitions first
