"""`liber llm-worker`: closed partitions in, cascaded interest summaries out (UIL).

One process, two threads:

- the main thread owns Kafka and RocksDB: it polls `partitions.closed` (consumer group
  `<app_id>-llm`, manual commits), validates records (bad ones go to `partitions.closed.dlq`),
  queues them per user, builds prompts, applies results, produces `summaries` and commits. It
  never waits on the model, so polling (and the group heartbeat) goes on during long calls;
  when `llm_max_queue` partitions are held it pauses the assigned partitions and resumes at half.
- LLM calls run on a small thread pool (`llm_concurrency`, default one call at a time).

Per partition: prompt (previous cascaded summary, or a cluster's collective summary for a cold
user, or in `naive` mode the whole history) -> one batched call -> parse -> one atomic RocksDB
write (new cascaded summary, last done seq, the Summary bytes) -> produce -> commit once the
producer has flushed. Commits stop below the oldest partition not yet done, so a restart
resumes there; a partition found already done is answered with its stored bytes.

Failures: a failed call (error, timeout, unparseable answer) is retried alone after a backoff
(doubling from `llm_retry_backoff_s`); after `llm_max_attempts` tries the partition goes to the
DLQ with the error in its headers and the user's next partition proceeds. Other users keep going
meanwhile: only the failing user's queue waits.

Commits follow the checkpoint protocol (state/checkpoint.py): sends are made durable first (a
refused summary is sent again, then its input record is dead-lettered, `send_failed`; a refused
dead letter is sent again without the record's bytes; what still fails is logged and counted
with the input's coordinates, `lost`), and the worker goes on: one record must never stop it (a
crash would only replay it forever). The run loop, stop signals and rebalance callbacks are the
shared worker base's (state/worker.py).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from kafka.errors import KafkaError

from core import logs
from core.activity import Activity
from core.clusters import cluster_of
from core import kafka as kafka_clients
from core.kafka import make_consumer, make_producer
from core.records import ClosedPartition, CollectiveSummary, InvalidRecord, Summary, decode
from core.settings import Settings
from core.topics import COLLECTIVE_SUMMARIES, PARTITIONS_CLOSED, SUMMARIES, dlq
from llm_workers import backends, collective, metrics, prompts, restore
from llm_workers.scheduler import Job, Scheduler, TokenBudget
from llm_workers.state import Store
from ops import metrics as ops_metrics
from state.checkpoint import Checkpoint, Offsets, Outbox
from state.worker import Worker

log = logging.getLogger("liber.llm")
COMMIT_INTERVAL_S = 0.5
MAX_BACKOFF_S = 60.0
STOP_GRACE_S = 10.0
# One try to reach the cluster at start; a failed one is logged and made again, without end.
BOOTSTRAP_TIMEOUT_MS = 10_000
RESTORE_RETRY_S = 1.0


class LLMWorker(Worker):
    name = "llm worker"

    def __init__(self, settings: Settings, backend: backends.Backend | None = None):
        super().__init__(logger=log, rebalances=ops_metrics.REBALANCES)
        self.s = settings = backends.resolve(settings)  # `auto` values decided once, here
        self.backend = backend or backends.create(settings)
        self.store = Store(settings.state_path / "llm-worker")
        self.topic_in = settings.topic(PARTITIONS_CLOSED)
        self.topic_out = settings.topic(SUMMARIES)
        self.topic_dlq = settings.topic(dlq(PARTITIONS_CLOSED))
        self.topic_collective = settings.topic(COLLECTIVE_SUMMARIES)
        self.scheduler = Scheduler(settings.llm_batch_size, settings.llm_batch_wait_s)
        self.budget = TokenBudget(settings.llm_budget_tpm)
        self.offsets = Offsets()
        self.executor = ThreadPoolExecutor(settings.llm_concurrency, thread_name_prefix="llm")
        self.inflight: dict[Future, tuple[list[Job], float, list]] = {}
        self.collective_queued: set[str] = set()
        self._dirty = False
        self._last_commit = 0.0
        self._produced: dict[int, int] = {}
        # Not idempotent: kafka-python's idempotent producer takes any refused record (too
        # large for a topic) as fatal and fails every later send. One request in flight keeps
        # the order; a retry may duplicate a record, which every reader of ours tolerates.
        self.producer = until_reachable("producer", lambda: make_producer(
            settings, client_id=f"{settings.app_id}-llm", acks="all", enable_idempotence=False,
            max_in_flight_requests_per_connection=1, linger_ms=5, retries=10,
            bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS))
        self.outbox = Outbox(self.producer, self.topic_dlq, metrics.SEND_FAILURES, logger=log,
                             prefix=settings.topic_prefix)
        self.consumer = until_reachable("consumer", lambda: make_consumer(
            settings, client_id=f"{settings.app_id}-llm", group_id=f"{settings.app_id}-llm",
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=min(500, settings.llm_max_queue),
            # a killed worker's partitions move on after 10 s, not kafka-python's 45 s
            # (heartbeats come from a thread of their own: a long LLM call does not stop them)
            session_timeout_ms=10_000, heartbeat_interval_ms=3_000,
            bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS))
        self.checkpoint = Checkpoint(self.consumer, self.outbox, self.offsets)
        # The metadata request goes to any broker the client knows, a dead one included (a
        # broker stays listed until the controller fences it): tried again, not fatal.
        self._closed_partitions = until_reachable(
            f"partitions of {self.topic_in}",
            lambda: len(self.consumer.partitions_for_topic(self.topic_in) or ())) or \
            settings.topic_partitions
        self.subscribe([self.topic_in])

    # --- main loop -------------------------------------------------------------------------------
    def announce(self) -> None:
        log.info("llm worker: backend=%s model=%s mode=%s batch=%d queue=%d budget_tpm=%d",
                 self.backend.name, self.backend.model, self.s.llm_mode, self.s.llm_batch_size,
                 self.s.llm_max_queue, self.s.llm_budget_tpm)

    def step(self) -> None:
        busy = bool(self.inflight) or len(self.scheduler) > 0
        records = self.poll(50 if busy else 500)  # restores new partitions before any prompt
        now = time.monotonic()
        for tp, batch in records.items():
            for rec in batch:
                self.accept(tp, rec, now)
        self.collect(now)
        self.dispatch(time.monotonic())
        self.flow_control()
        self.commit(time.monotonic())
        metrics.QUEUE_DEPTH.set(len(self.scheduler))
        metrics.BUDGET_USED.set(self.budget.used() if self.budget.enabled else 0)

    def restore_assigned(self, assigned: set) -> set:
        """Catch the state of newly assigned partitions up from `summaries` and rewind them to
        their committed offsets; returns them (their records polled meanwhile are dropped)."""
        # partitions we still hold jobs of (a cooperative rebalance may hand them out again)
        # need neither a restore nor a rewind
        fresh = {tp for tp in assigned if not self.offsets.tracks(tp)}
        if fresh:
            try:
                restore.catch_up(self.s, self.store, sorted(tp.partition for tp in fresh),
                                 self._closed_partitions)
                self._rewind(fresh)
            except (KafkaError, TimeoutError) as exc:
                # a broker going away meanwhile: their records wait for the next step,
                # which restores and rewinds them again
                log.warning("restore of %d assigned partitions failed (%r): retrying",
                            len(fresh), exc)
                self.retry_restore(fresh)
                time.sleep(RESTORE_RETRY_S)
        return fresh

    def drain(self) -> None:
        """Finish the calls in flight (a few seconds at most) and commit. Queued partitions
        are not committed: the next start gets them again."""
        deadline = time.monotonic() + STOP_GRACE_S
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
            self.collect(time.monotonic())
        self.commit(time.monotonic(), force=True)

    def release(self) -> None:
        self.backend.close()  # aborts a call still running, so the process can exit
        self.executor.shutdown(wait=True, cancel_futures=True)

    # --- input -------------------------------------------------------------------------------------
    def accept(self, tp, rec, now: float) -> None:
        self.offsets.received(tp, rec.offset)
        ops_metrics.RECORDS_IN.inc(tp.topic)
        try:
            record = decode(ClosedPartition, rec.value, key=rec.key,
                            max_bytes=self.s.max_payload_bytes)
        except Exception as exc:  # a decoder bug must not stop the worker on every restart
            reason, detail = ((exc.reason, exc.detail) if isinstance(exc, InvalidRecord)
                              else ("decode_error", repr(exc)[:500]))
            metrics.ERRORS.labels(kind="invalid_record").inc()
            self.dead_letter(tp, rec.offset, rec.key, rec.value, reason, detail)
            self.offsets.done(tp, rec.offset)
            self._dirty = True
            return
        self.scheduler.add(Job(key=record.user_id, kind="partition", arrived=now, record=record,
                               source=(tp, rec.offset, rec.key, rec.value),
                               weight=len(record.events),
                               closed_at=max(0, rec.timestamp or 0) / 1000))

    def flow_control(self) -> None:
        depth = len(self.scheduler)
        assigned = self.consumer.assignment()
        if depth >= self.s.llm_max_queue and assigned:
            if self.consumer.paused() != assigned:
                self.consumer.pause(*assigned)
                metrics.PAUSES.inc()
                log.info("queue full (%d partitions): consumer paused", depth)
            metrics.PAUSED.set(1)
        elif depth <= self.s.llm_max_queue // 2 and self.consumer.paused():
            self.consumer.resume(*self.consumer.paused())
            metrics.PAUSED.set(0)
            log.info("queue at %d: consumer resumed", depth)

    # --- dispatch ----------------------------------------------------------------------------------
    def dispatch(self, now: float) -> None:
        while len(self.inflight) < self.s.llm_concurrency:
            self._answer_redelivered(now)
            batch = self.scheduler.next_batch(now, self.prepare, self.budget)
            if not batch:
                if self.scheduler.throttled:
                    metrics.BUDGET_THROTTLED.inc()
                return
            tokens = sum(job.estimate for job in batch)
            entry = self.budget.spend(tokens, now)
            future = self.executor.submit(self.backend.generate, [j.prompt for j in batch],
                                          self.s.llm_max_new_tokens, timeout_s=self.s.llm_timeout_s)
            self.inflight[future] = (batch, now, entry)
            metrics.BATCH_SIZE.observe(len(batch))

    def _answer_redelivered(self, now: float) -> None:
        """Heads whose seq is already done: send the stored summary again, never a new one."""
        again = True
        while again:
            again = False
            for job in self.scheduler.heads(now):
                if job.kind != "partition":
                    continue
                state = self.store.user(job.key)
                if state is None or job.record.seq > state["seq"]:
                    continue
                stored = self.store.summary_bytes(job.key, job.record.seq)
                if stored is not None:
                    self.send(self.topic_out, job.key.encode(), stored, source=job.source)
                metrics.REDELIVERED.labels(action="republished" if stored else "skipped").inc()
                log.info("user %s seq %d already done (last %d): %s", job.key, job.record.seq,
                         state["seq"], "summary republished" if stored else "skipped")
                self.finish(job)
                again = True

    def prepare(self, job: Job) -> int:
        """Build the job's prompt from the current state; returns its token estimate."""
        s = self.s
        if job.kind == "collective":
            job.prompt = collective.prompt(job.cluster, self.store.cluster(job.cluster) or
                                           collective.new_state(),
                                           max_title_chars=s.llm_max_title_chars)
            job.context = prompts.CONTEXT_NONE
        elif s.llm_mode == "naive":
            job.prompt = self._naive_prompt(job)
            job.context = prompts.CONTEXT_HISTORY
        else:
            activities = _activities(job.record)
            state = self.store.user(job.key)
            if state and state.get("summary"):
                job.previous, kind = state["summary"], prompts.CONTEXT_PREVIOUS
                job.context = kind
            else:
                job.cluster = cluster_of(activities)
                group = self.store.cluster(job.cluster) if s.llm_collective_min_users else None
                if group and group.get("summary"):
                    job.previous, kind = group["summary"], prompts.CONTEXT_COLLECTIVE
                    job.context = f"{kind}:{job.cluster}"
                else:
                    job.previous, kind = None, prompts.CONTEXT_NONE
                    job.context = kind
            job.prompt = prompts.cascade_prompt(activities, context=job.previous, context_kind=kind,
                                                max_title_chars=s.llm_max_title_chars,
                                                max_context_chars=s.llm_max_summary_chars,
                                                template=s.llm_template)
        return self.backend.count_tokens(job.prompt) + s.llm_max_new_tokens

    def _naive_prompt(self, job: Job):
        earlier = [Activity(*row) for row in self.store.history(job.key)]
        prompt, dropped = prompts.fit_naive_prompt(
            earlier, _activities(job.record), self.backend.count_tokens,
            self.s.llm_max_prompt_tokens, max_title_chars=self.s.llm_max_title_chars,
            template=self.s.llm_template)
        if dropped:
            log.info("naive prompt of user %s: oldest %d of %d events dropped to fit %d tokens",
                     job.key, dropped, len(earlier), self.s.llm_max_prompt_tokens)
        return prompt

    # --- results -----------------------------------------------------------------------------------
    def collect(self, now: float) -> None:
        for future in list(self.inflight):
            batch, started, entry = self.inflight[future]
            if future.done():
                del self.inflight[future]
                self._handle(batch, future, entry)
            elif now - started > 2 * self.s.llm_timeout_s + 30:
                # The backend ignored its time limit: give the jobs up to the retry path and
                # take a fresh thread pool (the stuck thread finishes on its own, unheard).
                del self.inflight[future]
                log.error("LLM call stuck for %.0fs: abandoned", now - started)
                self.executor.shutdown(wait=False)
                self.executor = ThreadPoolExecutor(self.s.llm_concurrency, thread_name_prefix="llm")
                self.budget.settle(entry, 0)
                metrics.CALLS.labels(backend=self.backend.name, outcome="timeout").inc()
                for job in batch:
                    if not job.cancelled:
                        self.fail(job, "timeout", "LLM call stuck past twice its time limit")

    def _handle(self, batch: list[Job], future: Future, entry: list) -> None:
        name = self.backend.name
        try:
            generations = future.result()
            if len(generations) != len(batch):
                raise backends.LLMError(f"{len(generations)} answers for {len(batch)} prompts")
        except Exception as exc:  # noqa: BLE001 - every backend failure takes the retry path
            kind = "timeout" if isinstance(exc, backends.LLMTimeout) else "backend"
            self.budget.settle(entry, 0)
            metrics.CALLS.labels(backend=name, outcome=kind).inc()
            log.warning("LLM call of %d prompts failed: %r", len(batch), exc)
            for job in batch:
                if not job.cancelled:
                    self.fail(job, kind, repr(exc))
            return
        tokens_in = sum(g.tokens_in for g in generations)
        tokens_out = sum(g.tokens_out for g in generations)
        seconds = generations[0].seconds if generations else 0.0
        self.budget.settle(entry, tokens_in + tokens_out)
        metrics.CALLS.labels(backend=name, outcome="ok").inc()
        metrics.TOKENS_IN.labels(backend=name).inc(tokens_in)
        metrics.TOKENS_OUT.labels(backend=name).inc(tokens_out)
        metrics.COST.inc(tokens_in / 1000 * self.s.llm_price_in_per_1k +
                         tokens_out / 1000 * self.s.llm_price_out_per_1k)
        metrics.LATENCY.observe(seconds)
        metrics.MODEL_SECONDS.inc(seconds)
        for job, generation in zip(batch, generations):
            if job.cancelled:
                continue
            labels = job.prompt.structure or prompts.CASCADE_LABELS
            try:
                parsed = prompts.parse(job.prompt.prefix + generation.text, labels,
                                       previous=job.previous, max_chars=self.s.llm_max_summary_chars)
            except prompts.MalformedOutput as exc:
                self.fail(job, "malformed_output", str(exc))
                continue
            for repair in parsed.repairs:
                metrics.REPAIRS.labels(repair=repair).inc()
            if job.kind == "collective":
                self._finish_collective(job, parsed)
            else:
                self._finish_partition(job, generation, parsed)

    def _finish_partition(self, job: Job, generation, parsed) -> None:
        s, record = self.s, job.record
        summary = Summary(
            user_id=record.user_id, seq=record.seq,
            partition_summary=parsed[prompts.SUMMARY],
            shift=parsed[prompts.SHIFT],   # "" where the template does not ask for it
            cascaded_summary=parsed[prompts.PROFILE], tokens_in=generation.tokens_in,
            tokens_out=generation.tokens_out, backend=self.backend.name, model=self.backend.model,
            latency_s=round(generation.seconds, 4), mode=s.llm_mode, context=job.context,
            template=job.prompt.version, prompt_sha256=job.prompt.sha256(),
            end_ts=record.end_ts, closed_at=job.closed_at)
        value = summary.encode()
        old = self.store.user(record.user_id)
        state = {"seq": record.seq, "summary": summary.cascaded_summary,
                 "cluster": (old or {}).get("cluster") or job.cluster or None,
                 "partitions": (old or {}).get("partitions", 0) + 1,
                 "events": (old or {}).get("events", 0) + len(record.events)}
        history = None
        if s.llm_mode == "naive":
            history = self.store.history(record.user_id) + [
                [e.text, e.action, e.value] for e in record.events]
        group = None
        if old is None and job.cluster and s.llm_collective_min_users:
            group = (job.cluster, collective.add_user(
                self.store.cluster(job.cluster) or collective.new_state(), _activities(record)))
        self.store.finish(record.user_id, record.seq, state, value,
                          prompt={"seq": record.seq, "context": job.context,
                                  "system": job.prompt.system, "user": job.prompt.user},
                          history=history, cluster=group)
        self.send(self.topic_out, record.user_id.encode(), value, source=job.source)
        metrics.SUMMARIES.labels(mode=s.llm_mode, context=job.context.split(":")[0]).inc()
        self.finish(job)
        if group and collective.due(group[1], s.llm_collective_min_users) and \
                group[0] not in self.collective_queued:
            self.collective_queued.add(group[0])
            self.scheduler.add(Job(key="\0cluster:" + group[0], kind="collective",
                                   arrived=time.monotonic(), cluster=group[0]))

    def _finish_collective(self, job: Job, parsed) -> None:
        group = self.store.cluster(job.cluster) or collective.new_state()
        group.update(summary=parsed[prompts.PROFILE], generated_at_users=group["users"])
        self.store.put_cluster(job.cluster, group)
        # Published (compacted, key cluster) for the fusion worker's cold users.
        self.send(self.topic_collective, job.cluster.encode(), CollectiveSummary(
            cluster=job.cluster, summary=group["summary"], users=group["users"],
            model=self.backend.model, produced_at=round(time.time(), 3)).encode())
        metrics.COLLECTIVE.inc()
        log.info("collective summary of cluster %s (%d users): %s", job.cluster, group["users"],
                 group["summary"][:120])
        self.collective_queued.discard(job.cluster)
        self.scheduler.finish(job)

    def fail(self, job: Job, kind: str, detail: str) -> None:
        metrics.ERRORS.labels(kind=kind).inc()
        job.attempts += 1
        job.last_error = f"{kind}: {detail}"
        if job.attempts < self.s.llm_max_attempts:
            delay = min(MAX_BACKOFF_S, self.s.llm_retry_backoff_s * 2 ** (job.attempts - 1))
            metrics.RETRIES.inc()
            log.warning("%s %s: try %d failed (%s); retry in %.1fs", job.kind, job.key,
                        job.attempts, kind, delay)
            job.estimate = 0  # rebuilt on the next try, with the state of then
            job.prompt = None
            self.scheduler.retry_later(job, time.monotonic() + delay)
            return
        if job.kind == "collective":
            group = self.store.cluster(job.cluster) or collective.new_state()
            group["failed_at_users"] = group["users"]
            self.store.put_cluster(job.cluster, group)
            self.collective_queued.discard(job.cluster)
            log.error("collective summary of cluster %s failed %d times: %s", job.cluster,
                      job.attempts, job.last_error)
            self.scheduler.finish(job)
            return
        tp, offset, key, value = job.source
        log.error("user %s seq %s: %d tries failed, dead-lettered: %s", job.key, job.record.seq,
                  job.attempts, job.last_error)
        self.dead_letter(tp, offset, key, value, "llm_failed",
                         f"{job.attempts} tries; last {job.last_error}")
        self.finish(job)

    def finish(self, job: Job) -> None:
        self.scheduler.finish(job)
        if job.source:
            self.offsets.done(job.source[0], job.source[1])
            self._dirty = True

    # --- output and commits --------------------------------------------------------------------
    def send(self, topic: str, key: bytes | None, value: bytes, headers=None, *,
             source=None) -> None:
        self.outbox.send(topic, key, value, headers, source=source)

    def dead_letter(self, tp, offset: int, key, value, reason: str, detail: str) -> None:
        metrics.DEAD_LETTERED.labels(reason=reason).inc()
        logs.dead_letter(log, source_topic=tp.topic, partition=tp.partition, offset=offset,
                         reason=reason, detail=detail)
        self.outbox.dead_letter(tp, offset, key, value, reason, detail)

    def commit(self, now: float, force: bool = False, tps=None) -> None:
        """Steps 3-5 of the checkpoint (state/checkpoint.py; step 1 is `Store.finish`): make
        the sends durable, commit input offsets below the oldest undone record, then record
        the restore checkpoint."""
        if not (self._dirty or force) or (not force and now - self._last_commit < COMMIT_INTERVAL_S):
            return
        for out, meta in self.checkpoint.make_durable():  # failures followed up, never raised
            ops_metrics.RECORDS_OUT.inc(out.topic)
            if out.topic == self.topic_out:
                self._produced[meta.partition] = max(self._produced.get(meta.partition, 0),
                                                     meta.offset + 1)
        assigned = self.consumer.assignment()
        self.checkpoint.commit(self.checkpoint.committable(tps, assigned))
        if self._produced and self._closed_partitions == len(
                self.producer.partitions_for(self.topic_out)):
            # We are the only writer of these summaries partitions while we own the matching
            # input partitions: the restore checkpoint may skip what we wrote ourselves.
            owned = {tp.partition for tp in assigned}
            self.store.put_restore_offsets({p: o for p, o in self._produced.items() if p in owned})
            self._produced.clear()
        self._dirty = False
        self._last_commit = now

    # --- rebalances ----------------------------------------------------------------------------
    # The listener may run on the consumer's network thread (kafka-python 3): it must not block
    # on the consumer. It drops the revoked partitions' jobs, flushes what was produced (its own
    # client) and commits asynchronously; restoring newly assigned partitions from `summaries`
    # is left to the main loop (`restore_assigned`), before any prompt for them is built.
    def on_revoked(self, revoked: set) -> None:
        dropped = self.scheduler.drop(lambda job: job.source is not None and job.source[0] in revoked)
        if dropped:
            log.info("partitions revoked: %d queued partitions dropped (the new owner redoes "
                     "them)", len(dropped))
        super().on_revoked(revoked)
        # the next owner restores from summaries: ours must be there
        self.checkpoint.revoke(revoked, callback=_commit_logged)

    def _rewind(self, assigned: set) -> None:
        """Start newly assigned partitions at their committed offset. Jobs dropped at a
        revocation were fetched already; whether the client keeps or resets its position when
        the same partition comes back differs between versions, so set it explicitly (records
        fetched meanwhile are discarded by the caller and fetched again)."""
        for tp in assigned & self.consumer.assignment():
            committed = self.consumer.committed(tp)
            if committed is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)


def until_reachable(what: str, call):
    """`core.kafka.until_reachable`, logged as the LLM worker's."""
    return kafka_clients.until_reachable(what, call, logger=log)


def _commit_logged(offsets, response) -> None:
    if isinstance(response, Exception):
        log.warning("commit on revocation failed (the records come again, answered from "
                    "state): %r", response)


def _activities(record: ClosedPartition) -> list[Activity]:
    return [Activity(e.text, e.action, e.value) for e in record.events]


def run(settings: Settings) -> None:
    from llm_workers.dare import metrics as _dare_metrics  # noqa: F401  (liber_dare_* on /metrics)
    from core.topics import create_topics
    logs.started(log, "llm-worker", settings)
    backend = backends.create(settings)  # a bad backend or model fails before touching Kafka
    until_reachable("topic creation", lambda: create_topics(settings, log=log.info))
    ops_metrics.start(settings, {"llm-worker": settings.state_path / "llm-worker"})
    LLMWorker(settings, backend).run()
