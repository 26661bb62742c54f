"""`liber chaos`: inject one fault at a time during a MovieLens replay, then check invariants.

For each fault a fresh pipeline (own topic prefix, consumer groups and state directories) runs
on a local broker: the stream worker and the LLM worker as child processes (`liber worker`,
`liber llm-worker`, exactly what production runs), a replay thread producing MovieLens-100K
ratings at a fixed rate, and the fault injected mid-replay:

    kill_stream_worker  SIGKILL of the stream worker at ~40% of the events, then a restart
    kill_llm_worker     SIGKILL of the LLM worker in the middle of a batch, then a restart
    broker_restart      the broker stopped and started again on its data directory
    llm_errors          the backend fails every 2nd call and times out every 3rd (one partition
                        per call)
    slow_llm            every LLM call is held 4 s and the queue is small: the consumer pauses
                        (backpressure), the stream worker keeps up, the lag drains afterwards

With `cluster=3` (`liber chaos --cluster 3`) the pipeline runs on a three-node KRaft cluster
(`ops.local_kafka.LocalKafkaCluster`: topics with replication 3, `min.insync.replicas` 2,
every producer `acks=all`) and the faults are the cluster's own:

    broker_kill                     SIGKILL of the broker leading most of the run's
                                    partitions (not the active controller), then a restart
    controller_kill                 SIGKILL of the active KRaft controller (the metadata
                                    quorum's leader), then a restart
    rolling_restart                 each node in turn stopped and started, the next only once
                                    every replica is back in sync
    stream_worker_kill_broker_down  SIGKILL of the stream worker while a broker is down; it
                                    restarts and recovers on the two left, then the broker

A supervisor restarts a worker that exits on its own (as systemd or Kubernetes would) and
counts it. Once the replay is done and both consumer groups have no lag, the workers stop
cleanly and `liber.invariants.check` reads the topics. `soak()` is the load run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kafka import TopicPartition
from kafka.errors import KafkaError

from liber import invariants
from core import machine
from core.kafka import make_admin, make_consumer
from core.settings import Settings
from ops.local_kafka import LocalKafka, LocalKafkaCluster, Scratch, free_port, popen_bound
from ops.metrics import scrape
from streams import movielens
from streams.producer import BehaviorProducer
from streams.replay import in_laps, movie_item, rating_event, select
from core.topics import BEHAVIORS, PARTITIONS_CLOSED, SUMMARIES, create_topics

FAULTS = ("kill_stream_worker", "kill_llm_worker", "broker_restart", "llm_errors", "slow_llm")
CLUSTER_FAULTS = ("broker_kill", "controller_kill", "rolling_restart",
                  "stream_worker_kill_broker_down")
FAULT_BACKEND = "llm_workers.backends.fault:create"


_LIVE: list["Proc"] = []  # every worker started, stopped in the end whatever happened


def stop_all() -> None:
    for proc in _LIVE:
        if proc.alive():
            proc.stop(timeout=30)
    _LIVE.clear()


# --- processes -----------------------------------------------------------------------------
class Proc:
    """A `liber <command>` child process with its own metrics port and log file."""

    def __init__(self, settings: Settings, command: str, log_dir: Path, env: dict | None = None):
        self.command = command
        self.settings = settings
        self.log_dir = log_dir
        self.extra_env = env or {}
        self.starts = 0
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.port = free_port()
        settings = self.settings.replace(metrics_port=self.port)
        env = {**os.environ, **settings.to_env(), **self.extra_env, "PYTHONUNBUFFERED": "1"}
        self.starts += 1
        _LIVE.append(self)
        log = open(self.log_dir / f"{self.command}-{self.starts}.log", "ab")
        self.proc = popen_bound([sys.executable, "-m", "liber.cli", self.command], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metric(self, name: str, **labels) -> float | None:
        try:
            return scrape(f"http://127.0.0.1:{self.port}/metrics", name, **labels)
        except OSError:
            return None

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 60) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None


# --- replay --------------------------------------------------------------------------------
class Replay(threading.Thread):
    """Produce the chosen ratings at `rate` events/s. Records whose send fails (the broker is
    down) are sent again until acknowledged: a record that did land twice has the same event
    id, which the stream worker counts once."""

    def __init__(self, settings: Settings, events: list, rate: float, chunk: int = 50):
        super().__init__(daemon=True, name="replay")
        self.settings, self.events, self.rate, self.chunk = settings, events, rate, chunk
        self.sent = 0
        self.resent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            producer = BehaviorProducer(self.settings, max_block_ms=120_000,
                                        request_timeout_ms=15_000)
            start = time.monotonic()
            for i in range(0, len(self.events), self.chunk):
                pending = self.events[i:i + self.chunk]
                while pending:
                    futures = [(e, producer.send(e)) for e in pending]
                    try:
                        producer.flush(60)
                    except Exception:  # noqa: BLE001 - retried below, record by record
                        pass
                    pending = [e for e, f in futures if not (f.is_done and f.succeeded())]
                    if pending:
                        self.resent += len(pending)
                        time.sleep(1.0)
                self.sent = i + len(self.events[i:i + self.chunk])
                ahead = self.sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            producer.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc


# --- lag -------------------------------------------------------------------------------------
def group_lag(settings: Settings, group: str, topic: str) -> int | None:
    """End offset minus committed offset, summed over the topic's partitions (None: the broker
    does not answer)."""
    try:
        admin = make_admin(settings, request_timeout_ms=5000)
        consumer = make_consumer(settings, request_timeout_ms=5000, enable_auto_commit=False)
        try:
            committed = _group_offsets(admin, group)
            parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            ends = consumer.end_offsets(parts)
        finally:
            consumer.close()
            admin.close()
    except (KafkaError, OSError):  # a restarting broker
        return None
    return sum(end - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
               for tp, end in ends.items())


def _group_offsets(admin, group: str) -> dict:
    """{TopicPartition: OffsetAndMetadata} of a group (kafka-python 2 and 3 spell it apart)."""
    if hasattr(admin, "list_group_offsets"):  # kafka-python 3: {group: {tp: offset}}
        return admin.list_group_offsets(group).get(group, {})
    return admin.list_consumer_group_offsets(group)


@dataclass
class Pipeline:
    """One run's settings, workers and observations."""
    settings: Settings
    log_dir: Path
    llm_env: dict = field(default_factory=dict)
    with_llm: bool = True
    stream: Proc | None = None
    llm: Proc | None = None
    unexpected_exits: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)

    with_fusion: bool = False
    fusion: Proc | None = None

    def start(self) -> None:
        create_topics(self.settings, log=lambda m: None)
        self.stream = Proc(self.settings, "worker", self.log_dir)
        if self.with_llm:
            self.llm = Proc(self.settings, "llm-worker", self.log_dir, env=self.llm_env)
        if self.with_fusion:
            self.fusion = Proc(self.settings, "fusion-worker", self.log_dir)

    def workers(self) -> list[Proc]:
        return [p for p in (self.stream, self.llm, self.fusion) if p]

    def supervise(self) -> None:
        for proc in self.workers():
            if not proc.alive():
                self.unexpected_exits[proc.command] = self.unexpected_exits.get(proc.command, 0) + 1
                proc.start()

    def sample(self) -> dict:
        s = self.settings
        row = {"t": round(time.monotonic(), 1),
               "stream_lag": group_lag(s, s.app_id, s.topic(BEHAVIORS)),
               "stream_rss_mb": self.stream.rss_mb(),
               "events_in": self.stream.metric("liber_events_in_total")}
        if self.llm:
            row.update(llm_lag=group_lag(s, f"{s.app_id}-llm", s.topic(PARTITIONS_CLOSED)),
                       llm_queue=self.llm.metric("liber_llm_queue_depth"),
                       llm_paused=self.llm.metric("liber_llm_consumer_paused"),
                       llm_rss_mb=self.llm.rss_mb())
        if self.fusion:
            row["fusion_lag"] = group_lag(s, f"{s.app_id}-fusion", s.topic(SUMMARIES))
        self.samples.append(row)
        return row

    def drain(self, timeout: float, log) -> bool:
        """Wait until both groups have committed everything (lag 0 twice in a row)."""
        deadline = time.monotonic() + timeout
        zero = 0
        while time.monotonic() < deadline:
            self.supervise()
            row = self.sample()
            done = row["stream_lag"] == 0 and (not self.llm or row["llm_lag"] == 0) and \
                (not self.fusion or row["fusion_lag"] == 0)
            zero = zero + 1 if done else 0
            if zero >= 2:
                return True
            time.sleep(2.0)
        log(f"not drained after {timeout}s: {self.samples[-1]}")
        return False

    def stop(self) -> dict:
        return {p.command: p.stop() for p in self.workers()}


def wait_until(predicate, timeout: float, pipeline: Pipeline, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pipeline.supervise()
        if predicate():
            return True
        time.sleep(every)
    return False


# --- one fault -------------------------------------------------------------------------------
def pipeline_settings(base: Settings, bootstrap: str, state_root: Path, name: str,
                      **overrides) -> Settings:
    tag = f"{name}-{uuid.uuid4().hex[:6]}"
    return base.replace(bootstrap_servers=bootstrap, topic_prefix=f"chaos.{tag}.",
                        app_id=f"liber-chaos-{tag}", state_dir=str(state_root / tag),
                        **overrides)


def load_events(settings: Settings, users: int, per_user: int, dataset: str = "ml-100k"):
    data_dir = movielens.fetch(settings.home, datasets=(dataset,), log=lambda m: None)[dataset]
    ratings = select(movielens.load_ratings(data_dir, dataset), users=users, per_user=per_user)
    return ([rating_event(dataset, r) for r in ratings],
            [movie_item(m) for m in movielens.load_items(data_dir, dataset)])


def run_fault(fault: str, base: Settings, broker: LocalKafka | LocalKafkaCluster, workdir: Path,
              *, users: int, per_user: int, replay_s: float, drain_s: float,
              with_llm: bool = True, log=print) -> dict:
    """Run one fault and return its figures and the invariants' report."""
    llm_env = {}
    overrides = dict(batch_size=25, llm_backend=FAULT_BACKEND, llm_max_new_tokens=32, llm_batch_size=8,
                     llm_retry_backoff_s=0.5, llm_max_attempts=4, log_level="INFO",
                     drift_threshold=0.0)
    if isinstance(broker, LocalKafkaCluster):
        overrides["replication_factor"] = broker.size  # Faust's changelogs too
    if fault == "llm_errors":
        # one partition a call, and the 2nd call already fails: a short replay reaches the fault
        llm_env = {"LIBER_FAULT_ERROR_EVERY": "2", "LIBER_FAULT_TIMEOUT_EVERY": "3",
                   "LIBER_FAULT_TIMEOUT_S": "2"}
        overrides.update(llm_batch_size=1)
    elif fault == "slow_llm":
        llm_env = {"LIBER_FAULT_DELAY_S": "4"}
        overrides.update(llm_max_queue=8, llm_batch_size=4)
    settings = pipeline_settings(base, broker.bootstrap, workdir / "state", fault, **overrides)
    log_dir = workdir / "logs" / fault
    log_dir.mkdir(parents=True, exist_ok=True)
    events, items = load_events(settings, users, per_user)
    with_fusion = with_llm and fusion_available(settings)
    pipe = Pipeline(settings, log_dir, llm_env=llm_env, with_llm=with_llm, with_fusion=with_fusion)
    started = time.monotonic()
    pipe.start()
    with BehaviorProducer(settings) as producer:
        for item in items:
            producer.send_item(item)
    # the catalogue loaded = the stream worker consumes: only now does the replay's clock start
    wait_until(lambda: (pipe.stream.metric("liber_items_loaded_total") or 0) >= len(items), 180,
               pipe)
    replication = replication_of(settings, broker) if isinstance(broker, LocalKafkaCluster) \
        else None
    replay = Replay(settings, events, rate=max(1.0, len(events) / replay_s))
    replay.start()
    if isinstance(broker, LocalKafkaCluster):
        injected = inject_cluster(fault, pipe, broker, len(events), log)
    else:
        injected = inject(fault, pipe, broker, len(events), log)
    while replay.is_alive():
        pipe.supervise()
        pipe.sample()
        replay.join(1.0)
    if replay.error:
        raise RuntimeError(f"replay failed: {replay.error!r}")
    at_replay_end = pipe.sample()
    drained = pipe.drain(drain_s, log)
    llm_counts = {name: pipe.llm.metric(f"liber_llm_{name}_total")
                  for name in ("errors", "retries", "summaries")} if pipe.llm else {}
    exits = pipe.stop()
    report = invariants.check(settings, require_summaries=with_llm, require_vectors=with_fusion)
    lags = [r["stream_lag"] for r in pipe.samples if r["stream_lag"] is not None]
    result = {
        "fault": fault, "injected": injected, "events_sent": len(events),
        "resent_after_errors": replay.resent,
        "events_in": report.events_in, "events_accounted": report.events_accounted,
        "lost": report.lost, "duplicate_summaries": report.duplicate_summaries,
        "version_regressions": report.version_regressions,
        "ok": report.ok and drained and not pipe.unexpected_exits,
        "drained": drained, "unexpected_exits": pipe.unexpected_exits,
        "exit_codes": exits, "seconds": round(time.monotonic() - started, 1),
        "stream_lag_max": max(lags, default=None),
        "stream_lag_at_replay_end": at_replay_end["stream_lag"],
        "llm_worker_counts_last_process": llm_counts, "fusion_worker": with_fusion,
        "invariants": report.to_dict(),
    }
    if replication is not None:
        result["replication"] = replication
        result["ok"] = result["ok"] and replication["ok"]
    if pipe.llm:
        queue = [r["llm_queue"] for r in pipe.samples if r.get("llm_queue") is not None]
        llm_lags = [r["llm_lag"] for r in pipe.samples if r.get("llm_lag") is not None]
        result.update(llm_queue_max=max(queue, default=None), llm_lag_max=max(llm_lags, default=None),
                      llm_lag_final=llm_lags[-1] if llm_lags else None,
                      llm_paused_seen=any(r.get("llm_paused") for r in pipe.samples))
        if fault == "slow_llm":
            result["queue_bounded"] = (result["llm_queue_max"] or 0) <= 2 * settings.llm_max_queue
            result["ok"] = result["ok"] and result["queue_bounded"]
    return result


def fusion_available(settings: Settings) -> bool:
    """The fusion worker needs a trained model artifact; without one it is left out."""
    try:
        from models.artifact import default_artifact_dir, resolve
        path = settings.fusion_model_dir or default_artifact_dir(settings)
        return Path(path).exists() and resolve(path).exists()
    except Exception:  # noqa: BLE001 - no artifact, or its package is not importable
        return False


def inject(fault: str, pipe: Pipeline, broker: LocalKafka, total: int, log) -> dict:
    """Wait for the moment of the fault, inject it, bring the part back; returns what happened."""
    def events_in() -> float:
        return pipe.stream.metric("liber_events_in_total") or 0.0

    if fault in ("kill_stream_worker", "broker_restart"):
        reached = wait_until(lambda: events_in() >= 0.4 * total, 300, pipe)
        at = events_in()
        if fault == "kill_stream_worker":
            pipe.stream.kill()
            log(f"{fault}: SIGKILL at {at:.0f}/{total} events in")
            pipe.stream.start()
        else:
            broker.stop(log=log)
            time.sleep(3)
            broker.start(log=log)
        return {"at_events_in": at, "reached": reached}
    if fault == "kill_llm_worker":
        def summaries() -> float:
            return pipe.llm.metric("liber_llm_summaries_total") or 0.0
        reached = wait_until(lambda: summaries() >= 1, 600, pipe)
        # a batch just ended; the next one starts at once: kill halfway through a mean call
        done = summaries()
        wait_until(lambda: summaries() > done, 300, pipe, every=0.2)
        calls = pipe.llm.metric("liber_llm_latency_seconds_count") or 1.0
        mean = (pipe.llm.metric("liber_llm_latency_seconds_sum") or 2.0) / calls
        time.sleep(mean / 2)
        at = summaries()
        pipe.llm.kill()
        log(f"{fault}: SIGKILL after {at:.0f} summaries, {mean / 2:.1f}s into a batch")
        pipe.llm.start()
        return {"at_summaries": at, "reached": reached, "into_batch_s": round(mean / 2, 2)}
    return {"from_start": True}


# --- cluster faults ----------------------------------------------------------------------------
def _cluster_admin(cluster: LocalKafkaCluster, **options):
    """An admin client of the local cluster itself (plaintext, whatever the run's settings)."""
    return make_admin(Settings(bootstrap_servers=cluster.bootstrap), **options)


def run_topics(settings: Settings, cluster: LocalKafkaCluster) -> list[str]:
    """The run's topics: its prefixed ones and Faust's changelogs (named after the app id)."""
    admin = _cluster_admin(cluster, request_timeout_ms=10000)
    try:
        return sorted(t for t in admin.list_topics()
                      if t.startswith(settings.topic_prefix) or t.startswith(settings.app_id))
    finally:
        admin.close()


def replication_of(settings: Settings, cluster: LocalKafkaCluster) -> dict:
    """Replication factor and min.insync.replicas of the run's topics and of the consumer
    offsets, as the cluster reports them."""
    from kafka.admin import ConfigResource, ConfigResourceType
    topics = run_topics(settings, cluster) + ["__consumer_offsets"]
    factors = {p["topic"]: len(p["replicas"]) for p in cluster.partitions(topics)}
    admin = _cluster_admin(cluster, request_timeout_ms=10000)
    try:
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t, configs={"min.insync.replicas": None})
             for t in topics], config_filter="all")
    finally:
        admin.close()
    min_isr = {name: int(configs["min.insync.replicas"]["value"])
               for by_name in described.values() for name, configs in by_name.items()
               if "min.insync.replicas" in configs}
    wanted_isr = min(cluster.min_insync, cluster.size)
    return {"topics": len(topics),
            "replication_factors": sorted(set(factors.values())),
            "min_insync_replicas": sorted(set(min_isr.values())),
            "ok": len(factors) == len(topics) and set(factors.values()) == {cluster.size}
            and len(min_isr) == len(topics) and set(min_isr.values()) == {wanted_isr}}


def inject_cluster(fault: str, pipe: Pipeline, cluster: LocalKafkaCluster, total: int,
                   log) -> dict:
    """A cluster fault at ~40% of the events in; every node is back and in sync on return."""
    def events_in() -> float:
        return pipe.stream.metric("liber_events_in_total") or 0.0

    # the fault hits a running pipeline, not one whose workers are still joining
    groups = [pipe.settings.app_id] + ([f"{pipe.settings.app_id}-llm"] if pipe.llm else [])
    ready = wait_until(lambda: all(_group_stable(cluster, g) for g in groups), 300, pipe, every=1)
    reached = wait_until(lambda: events_in() >= 0.4 * total, 300, pipe)
    at = events_in()
    topics = run_topics(pipe.settings, cluster)
    started = time.monotonic()
    out: dict = {"at_events_in": at, "reached": reached, "workers_joined_first": ready}
    if fault in ("broker_kill", "stream_worker_kill_broker_down"):
        controller = cluster.active_controller()
        leaders = cluster.leaders(topics)
        victim = max((n for n in leaders if n > 0 and n != controller),
                     key=leaders.get, default=next(n.node_id for n in cluster.nodes
                                                   if n.node_id != controller))
        cluster.node(victim).kill(log=log)
        log(f"{fault}: SIGKILL of broker {victim} at {at:.0f}/{total} events in")
        # its partitions get new leaders among the two left
        moved = _poll_quiet(lambda: victim not in cluster.leaders(topics), 60)
        out.update(node=victim, leaders_before=_keys(leaders),
                   leaders_while_down=_keys(cluster.leaders(topics)), leaders_moved=moved)
        if fault == "stream_worker_kill_broker_down":
            pipe.stream.kill()
            before = events_in()
            log(f"{fault}: SIGKILL of the stream worker with broker {victim} down")
            pipe.stream.start()
            # the restarted worker recovers its state and consumes on the two brokers left
            out["stream_worker_resumed_with_broker_down"] = wait_until(
                lambda: events_in() > 0 and (events_in() > before or
                                              pipe.sample()["stream_lag"] == 0), 300, pipe)
        else:
            time.sleep(5)  # producers and consumers carry on without it for a while
        cluster.restart(victim, log=log)
    elif fault == "controller_kill":
        controller = cluster.active_controller()
        cluster.node(controller).kill(log=log)
        log(f"{fault}: SIGKILL of the active controller {controller} at {at:.0f}/{total} events in")
        new = _poll_quiet(lambda: (lambda c: c if c != controller else None)(
            cluster.active_controller()), 60)
        out.update(killed_controller=controller, new_controller=new)
        time.sleep(3)
        cluster.restart(controller, log=log)
    elif fault == "rolling_restart":
        for node in cluster.nodes:
            log(f"{fault}: restarting broker {node.node_id}")
            node.stop(log=log)
            cluster.restart(node.node_id, log=log)
        out["order"] = [n.node_id for n in cluster.nodes]
    else:
        raise ValueError(f"not a cluster fault: {fault}")
    out["fault_seconds"] = round(time.monotonic() - started, 1)
    out["leaders_after"] = _keys(cluster.leaders(topics))
    return out


def _group_stable(cluster: LocalKafkaCluster, group: str) -> bool:
    try:
        admin = _cluster_admin(cluster, request_timeout_ms=5000)
        try:
            info = admin.describe_groups([group]).get(group, {})
        finally:
            admin.close()
    except (KafkaError, OSError):
        return False
    return info.get("group_state") == "Stable" and bool(info.get("members"))


def _keys(counts: dict) -> dict:
    return {str(k): v for k, v in sorted(counts.items())}


def _poll_quiet(probe, timeout: float):
    """probe() until it is true (client errors while the cluster settles count as not yet);
    its last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (KafkaError, OSError):
            value = None
        if value:
            return value
        time.sleep(0.5)
    return value


# --- entry points ------------------------------------------------------------------------------
def _quiet() -> None:
    import logging
    for noisy in ("kafka", "aiokafka"):  # client retries during faults are expected
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


def _broker(settings: Settings, workdir: Path, cluster: int = 0):
    """The run's broker, or with `cluster` that many nodes. Neither outlives this process
    (ops/local_kafka.py), and SIGTERM unwinds through the `finally`s that stop them."""
    _quiet()
    if cluster:
        return LocalKafkaCluster(settings.home, workdir / "kafka", size=cluster)
    return LocalKafka(settings.home, workdir / "kafka", port=free_port())


def run(settings: Settings, faults=None, *, users: int = 10, per_user: int = 50,
        replay_s: float = 20.0, drain_s: float = 600.0, workdir: str | None = None,
        cluster: int = 0, log=print) -> dict:
    """Each fault on its own pipeline; `cluster`: on a cluster of that many nodes, with the
    cluster's faults by default. A temporary work directory is kept when the run returns
    (the result names it) and removed when it is interrupted."""
    faults = tuple(faults or (CLUSTER_FAULTS if cluster else FAULTS))
    scratch = None if workdir else Scratch("liber-chaos-")
    root = Path(workdir) if workdir else scratch.path
    broker = _broker(settings, root, cluster)
    results = []
    finished = False
    try:
        broker.start(log=log)
        for fault in faults:
            log(f"== {fault}")
            results.append(run_fault(fault, settings, broker, root, users=users,
                                     per_user=per_user, replay_s=replay_s, drain_s=drain_s,
                                     log=log))
            r = results[-1]
            log(f"   events_in={r['events_in']} accounted={r['events_accounted']} lost={r['lost']} "
                f"duplicate_summaries={r['duplicate_summaries']} "
                f"version_regressions={r['version_regressions']} ok={r['ok']}")
        finished = True
    finally:
        stop_all()
        broker.stop(log=log)
        if scratch:
            scratch.close(keep=finished)
    result = {"faults": results, "ok": all(r["ok"] for r in results), "workdir": str(root),
              "users": users, "per_user": per_user, "machine": machine.describe()}
    if cluster:
        result["cluster"] = {"nodes": cluster, "min_insync_replicas": broker.min_insync,
                             "broker_heap": broker.heap}
    return result


def soak_events(ratings: list, count: int, users: int | None = None) -> tuple[list, int]:
    """The soak's `count` events and how many laps they make: the first ratings of MovieLens-1M
    in time order (one lap, a growing population: new users keep arriving), or with `users`
    the ratings of the first `users` users in laps (`streams.replay.in_laps`: a fixed
    population, so per-user state is bounded). `ratings`: ML-1M's, in time order."""
    if not users:
        return [rating_event("ml-1m", r) for r in ratings[:count]], 1
    population = [rating_event("ml-1m", r) for r in select(ratings, users=users)]
    return in_laps(population, count), -(-count // len(population))


def users_seen(events: list) -> list[int]:
    """seen[i]: distinct users among the first i events."""
    users: set[str] = set()
    seen = [0]
    for e in events:
        users.add(e.user_id)
        seen.append(len(users))
    return seen


def soak(settings: Settings, seconds: float, rate: float, *, users: int | None = None,
         with_llm: bool = False, sample_s: float = 5.0, workdir: str | None = None,
         log=print) -> dict:
    """Replay MovieLens-1M at `rate` events/s for `seconds` (`users`: a fixed population in
    laps, see `soak_events`); sample lag and memory."""
    scratch = None if workdir else Scratch("liber-soak-")
    root = Path(workdir) if workdir else scratch.path
    broker = _broker(settings, root)
    finished = False
    try:
        broker.start(log=log)
        s = pipeline_settings(settings, broker.bootstrap, root / "state", "soak",
                              drift_threshold=0.0, log_level="WARNING")
        log_dir = root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        count = int(seconds * rate)
        data_dir = movielens.fetch(s.home, datasets=("ml-1m",), log=lambda m: None)["ml-1m"]
        events, laps = soak_events(movielens.load_ratings(data_dir, "ml-1m"), count, users)
        seen = users_seen(events)
        pipe = Pipeline(s, log_dir, with_llm=with_llm)
        pipe.start()
        with BehaviorProducer(s) as producer:
            for movie in movielens.load_items(data_dir, "ml-1m"):
                producer.send_item(movie_item(movie))
        replay = Replay(s, events, rate=rate, chunk=500)
        started = time.monotonic()
        replay.start()
        while replay.is_alive():
            pipe.supervise()
            row = pipe.sample()
            row["sent"], row["users_seen"] = replay.sent, seen[replay.sent]
            row["load_1m"] = os.getloadavg()[0]  # the machine may be shared: say how busy
            log(f"soak t={time.monotonic() - started:.0f}s sent={replay.sent} "
                f"in={row['events_in']} lag={row['stream_lag']} rss={row['stream_rss_mb']}")
            replay.join(sample_s)
        replay_seconds = time.monotonic() - started
        drained = pipe.drain(300, log)
        pipe.stop()
        report = invariants.check(s, require_summaries=with_llm)
        finished = True
    finally:
        stop_all()
        broker.stop(log=log)
        if scratch:
            scratch.close(keep=finished)
    rows = [r for r in pipe.samples if r["stream_rss_mb"] is not None]
    lags = [r["stream_lag"] for r in pipe.samples if r["stream_lag"] is not None]
    # Memory trend over the replay only (not the drain), after a minute of warm-up.
    replaying = [r for r in rows if "sent" in r] or rows
    warm = [r for r in replaying if r["t"] - replaying[0]["t"] >= 60] or replaying
    first, half = warm[:len(warm) // 2], warm[len(warm) // 2:]
    rss = [r["stream_rss_mb"] for r in rows]
    loads = sorted(r["load_1m"] for r in replaying if "load_1m" in r)

    def per_min(part: list) -> float:
        return round(_slope([(r["t"], r["stream_rss_mb"]) for r in part]) * 60, 2)

    # RSS against users seen so far (growing population only): an upper bound of the memory
    # per user, as it also takes in whatever grows per event.
    per_user = [(r["users_seen"], r["stream_rss_mb"]) for r in warm if "users_seen" in r
                and not users]
    return {
        "seconds": seconds, "rate_target": rate, "events_sent": len(events),
        "population": f"fixed: {users} users in laps" if users else "growing: ML-1M in time order",
        "users_seen": seen[-1], "laps": laps,
        "stream_rss_mb_per_1000_users_seen": round(_slope(per_user) * 1000, 2)
        if len({u for u, _ in per_user}) > 1 else None,
        "rate_achieved": round(len(events) / replay_seconds, 1),
        "events_in": report.events_in, "lost": report.lost, "invariants_ok": report.ok,
        "partitions": report.partitions, "drained": drained,
        "unexpected_exits": pipe.unexpected_exits,
        "stream_lag_max": max(lags, default=None),
        "stream_lag_median": sorted(lags)[len(lags) // 2] if lags else None,
        "stream_lag_final": lags[-1] if lags else None,
        "stream_rss_mb_after_60s": round(warm[0]["stream_rss_mb"], 1) if warm else None,
        "stream_rss_mb_at_half": round(half[0]["stream_rss_mb"], 1) if half else None,
        "stream_rss_mb_replay_end": round(warm[-1]["stream_rss_mb"], 1) if warm else None,
        "stream_rss_mb_end": round(rss[-1], 1) if rss else None,
        "stream_rss_mb_max": round(max(rss), 1) if rss else None,
        "stream_rss_slope_mb_per_min_first_half": per_min(first),
        "stream_rss_slope_mb_per_min_second_half": per_min(half),
        "load_avg_1m_median_during_replay": round(loads[len(loads) // 2], 2) if loads else None,
        "samples": len(pipe.samples), "workdir": str(root), "machine": machine.describe(),
    }


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two points)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
