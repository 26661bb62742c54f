"""`liber fusion-worker`: summaries in, dense interest vectors out (UIF, online half).

One process, one thread, kafka-python like the LLM worker:

- consumer group `<app_id>-fusion` reads `summaries` and `partitions.closed` (range assignment:
  both topics are keyed by user id with equal partition counts, so one worker holds all of a
  user's records); a second, groupless consumer follows the compacted `collective-summaries`.
- per user, RocksDB keeps the latest K partition summaries and the cascaded summary
  (fusion/state.py); each micro-batch (up to `fusion_batch_size` records) applies
  what is new and encodes every changed user in one call of the trained InterestModel
  (text encoder + attention fusion + hybrid-expert adaptor, models/artifact.py).
- output: `InterestVector` records on the compacted `user-interests` topic, version = seq.

Ordering and idempotence: a summary with a seq at or below the user's newest is not applied
again, so versions per user only grow; a redelivered seq equal to the last one we published
republishes the stored bytes (the batch may have crashed before its vector left), anything
older republishes nothing. Per batch, the checkpoint protocol (state/checkpoint.py): state
written (one WriteBatch) -> vectors produced and made durable -> input offsets committed.

Cold users: a user's first closed partition fixes their cluster (the genre signature the LLM
worker uses too, core/clusters.py). Until their own first summary arrives they get the
vector of the cluster's collective summary, `collective=true`, version -1, as soon as both are
known. Bad summaries go to `summaries.dlq` with the reason; bad partitions are left to the LLM
worker, which dead-letters them (counted here only).

Rebalances: on assignment the local state of a partition is brought up to the group's
committed offset by replaying the input from the locally applied offset (state only, nothing
produced: the previous owner published those vectors).
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor

from core import logs
from core.activity import Activity
from core.clusters import cluster_of
from core.kafka import key_partition, make_consumer, make_producer
from core.records import (ClosedPartition, CollectiveSummary, InterestVector, InvalidRecord,
                          Summary, decode)
from core.settings import Settings
from core.topics import (COLLECTIVE_SUMMARIES, PARTITIONS_CLOSED, SUMMARIES, USER_INTERESTS,
                         dlq)
from fusion import metrics
from fusion.state import Changes, FusionStore, new_user
from ops import metrics as ops_metrics
from state.checkpoint import Checkpoint, Outbox
from state.worker import Worker

log = logging.getLogger("liber.fusion")
COLLECTIVE_VERSION = -1  # below every own version (seq >= 0)
COLLECTIVE_RECHECK_S = 2.0  # how often a missing collective-summaries topic is looked for


def float32_values(vector: np.ndarray) -> tuple[float, ...]:
    """Each value as the shortest decimal that reads back as the same float32: compact JSON
    that a reader casting to float32 gets bit-exact."""
    return tuple(float(str(v)) for v in np.asarray(vector, dtype=np.float32))


class FusionWorker(Worker):
    name = "fusion worker"

    def __init__(self, settings: Settings, model):
        super().__init__(logger=log, rebalances=ops_metrics.REBALANCES)
        self.s, self.model = settings, model
        self.k = int(getattr(model, "k", 4))
        self.store = FusionStore(settings.state_path / "fusion-worker")
        self.topics = {settings.topic(t): t for t in (SUMMARIES, PARTITIONS_CLOSED)}
        self.topic_out = settings.topic(USER_INTERESTS)
        self.topic_dlq = settings.topic(dlq(SUMMARIES))
        # Not idempotent: kafka-python's idempotent producer takes any refused record (too
        # large for a topic) as fatal and fails every later send. One request in flight keeps
        # the order; a retry may duplicate a record, which every reader of ours tolerates.
        self.producer = make_producer(settings, client_id=f"{settings.app_id}-fusion", acks="all",
                                      enable_idempotence=False,
                                      max_in_flight_requests_per_connection=1, linger_ms=5,
                                      retries=10)
        self.outbox = Outbox(self.producer, self.topic_dlq, metrics.SEND_FAILURES, logger=log,
                             prefix=settings.topic_prefix)
        self.consumer = make_consumer(
            settings, client_id=f"{settings.app_id}-fusion", group_id=f"{settings.app_id}-fusion",
            enable_auto_commit=False, auto_offset_reset="earliest",
            partition_assignment_strategy=[RangePartitionAssignor],
            max_poll_records=settings.fusion_batch_size)
        self.checkpoint = Checkpoint(self.consumer, self.outbox)
        self.subscribe(list(self.topics))
        self._n_partitions = len(self.consumer.partitions_for_topic(
            settings.topic(PARTITIONS_CLOSED)) or ()) or settings.topic_partitions
        # Every worker needs every cluster's collective summary: read the compacted topic whole.
        self.collective_consumer = make_consumer(
            settings, client_id=f"{settings.app_id}-fusion-collective", enable_auto_commit=False,
            max_poll_records=settings.fusion_batch_size)
        self._collective_checked = 0.0
        if not self._follow_collective():
            log.warning("topic %s missing: no collective vectors for cold users until it is "
                        "created", settings.topic(COLLECTIVE_SUMMARIES))

    def _follow_collective(self) -> bool:
        """Assign every partition of collective-summaries, from the beginning; False while the
        topic does not exist (it may be created after we started: looked for again later)."""
        self._collective_checked = time.monotonic()
        name = self.s.topic(COLLECTIVE_SUMMARIES)
        parts = self.collective_consumer.partitions_for_topic(name) or ()
        if not parts:
            return False
        self.collective_consumer.assign([TopicPartition(name, p) for p in sorted(parts)])
        self.collective_consumer.seek_to_beginning()
        log.info("following %s (%d partitions)", name, len(parts))
        return True

    # --- main loop -------------------------------------------------------------------------------
    def announce(self) -> None:
        log.info("fusion worker: model %s (dim %d, k %d), batch %d", self.model.version,
                 self.model.dim, self.k, self.s.fusion_batch_size)

    def release(self) -> None:
        self.collective_consumer.close()

    def step(self, poll_ms: int = 300) -> None:
        polled = self.poll(poll_ms)  # restores newly assigned partitions first
        collective_records = []
        if not self.collective_consumer.assignment() and \
                time.monotonic() - self._collective_checked >= COLLECTIVE_RECHECK_S:
            self._follow_collective()
        if self.collective_consumer.assignment():
            collective_records = [r for recs in self.collective_consumer.poll(timeout_ms=0).values()
                                  for r in recs]
        if polled or collective_records:
            self.process(polled, collective_records)

    # --- one micro-batch -------------------------------------------------------------------------
    def process(self, polled: dict, collective_records: list, *, publish: bool = True) -> None:
        changes = self.store.batch()
        # user, value, kind, closed_at, produced_at, source record (tp, offset, key, value)
        out: list[tuple[str, bytes, str, float, float, tuple | None]] = []
        summaries, partitions = [], []
        for tp, recs in polled.items():
            logical = self.topics[tp.topic]
            if publish:
                metrics.RECORDS_IN.labels(topic=logical).inc(len(recs))
            (summaries if logical == SUMMARIES else partitions).extend((tp, r) for r in recs)
            changes.put_offset(tp.topic, tp.partition, recs[-1].offset + 1)
        if collective_records:
            self._apply_collective(collective_records, changes, out, publish)
        self._apply_summaries(summaries, changes, out, publish)
        self._apply_partitions(partitions, changes, out, publish)
        self.store.write(changes)  # step 1: state before output, output before commit
        if not publish:
            return
        self._produce(out)  # steps 2 and 3
        # step 4: every record of the batch is finished, so each partition commits past its last
        self.checkpoint.commit({tp: recs[-1].offset + 1 for tp, recs in polled.items()})

    def _user(self, changes: Changes, user_id: str) -> dict | None:
        state = changes.users.get(user_id)
        return state if state is not None else self.store.user(user_id)

    def _apply_summaries(self, records, changes: Changes, out: list, publish: bool) -> None:
        changed: dict[str, dict] = {}                 # user -> new state, vector not yet made
        sources: dict[str, list] = defaultdict(list)  # user -> its records in this batch
        republish: dict[str, tuple] = {}
        for tp, rec in records:
            try:
                summary = decode(Summary, rec.value, key=rec.key, max_bytes=self.s.max_payload_bytes)
            except InvalidRecord as exc:
                metrics.ERRORS.labels(kind="invalid_record").inc()
                self._dead_letter(tp, rec, exc.reason, exc.detail, publish)
                continue
            user = summary.user_id
            state = changed.get(user) or self._user(changes, user) or new_user()
            if summary.seq > state["seq"]:
                state = {**state, "seq": summary.seq, "cascaded": summary.cascaded_summary,
                         "partitions": ([summary.partition_summary] + state["partitions"])[:self.k],
                         "end_ts": summary.end_ts, "closed_at": summary.closed_at}
                changed[user] = state
                sources[user].append((tp, rec))
            elif summary.seq == state["version"] and user not in changed:
                republish[user] = _source(tp, rec)  # its batch may have died before producing
            else:
                metrics.SKIPPED.labels(reason="older").inc()
        for user in set(republish) - set(changed):
            stored = self.store.vector_bytes(user)
            if stored is not None:
                out.append((user, stored, "republished", 0.0, 0.0, republish[user]))
        if not changed:
            return
        if not publish:  # restore: the previous owner published these vectors
            for user, state in changed.items():
                changes.put_user(user, state)
                if state["cluster"] is not None:
                    changes.drop_member(state["cluster"], user)
            return
        vectors = self._encode(changed, sources, publish)
        now = round(time.time(), 3)
        for user, vector in vectors.items():
            state = changed[user]
            record = InterestVector(
                user_id=user, version=state["seq"], vector=float32_values(vector),
                dim=int(vector.shape[0]), model_version=self.model.version, produced_at=now,
                event_watermark=state["end_ts"])
            if state["cluster"] is not None and state["version"] is None:
                changes.drop_member(state["cluster"], user)
            changes.put_user(user, {**state, "version": state["seq"]})
            value = record.encode()
            changes.put_vector(user, value)
            out.append((user, value, "own", state["closed_at"], now,
                        _source(*sources[user][-1])))

    def _encode(self, changed: dict[str, dict], sources: dict, publish: bool) -> dict:
        """One model call for the batch; when it fails, user by user, and a user whose vector
        cannot be made has its summaries dead-lettered (reason `fusion_failed`)."""
        users = list(changed)
        inputs = [(changed[u]["partitions"], changed[u]["cascaded"]) for u in users]
        try:
            return dict(zip(users, self._vectors(inputs)))
        except Exception as exc:  # noqa: BLE001 - isolate the user that breaks the batch
            log.warning("interest model failed on a batch of %d users (%r): retrying one by one",
                        len(users), exc)
        vectors = {}
        for user, item in zip(users, inputs):
            try:
                vectors[user] = self._vectors([item])[0]
            except Exception as exc:  # noqa: BLE001
                metrics.ERRORS.labels(kind="model").inc()
                for tp, rec in sources[user]:
                    self._dead_letter(tp, rec, "fusion_failed", repr(exc), publish)
        return vectors

    def _vectors(self, inputs: list) -> np.ndarray:
        started = time.monotonic()
        vectors = np.asarray(self.model.user_vectors(inputs), dtype=np.float32)
        metrics.MODEL_SECONDS.inc(time.monotonic() - started)
        metrics.BATCH_USERS.observe(len(inputs))
        if vectors.shape[0] != len(inputs) or not np.isfinite(vectors).all():
            raise ValueError(f"model returned shape {vectors.shape} with non-finite values "
                             f"or a wrong row count for {len(inputs)} users")
        return vectors

    def _apply_partitions(self, records, changes: Changes, out: list, publish: bool) -> None:
        """A user's first partition fixes their cold-start cluster; with the cluster's
        collective vector known, the user gets it at once."""
        for tp, rec in records:
            try:
                part = decode(ClosedPartition, rec.value, key=rec.key,
                              max_bytes=self.s.max_payload_bytes)
            except InvalidRecord:
                metrics.ERRORS.labels(kind="invalid_partition").inc()  # the LLM worker DLQs it
                continue
            user = part.user_id
            state = self._user(changes, user)
            if state is not None and (state["cluster"] is not None or state["seq"] >= 0):
                if state["version"] == COLLECTIVE_VERSION and state.get("first_seq") == part.seq:
                    stored = self.store.vector_bytes(user)  # redelivered first partition
                    if stored is not None:
                        out.append((user, stored, "republished", 0.0, 0.0, _source(tp, rec)))
                else:
                    metrics.SKIPPED.labels(reason="known").inc()
                continue
            cluster = cluster_of([Activity(e.text, e.action, e.value) for e in part.events])
            closed_at = max(0, rec.timestamp or 0) / 1000
            state = {**new_user(), "cluster": cluster, "first_seq": part.seq}
            vector = self._collective_vector(changes, cluster)
            if vector is None:
                changes.put_user(user, state)
                changes.add_member(cluster, user, {"end_ts": part.end_ts, "closed_at": closed_at})
                continue
            self._publish_collective(changes, out, user, state, cluster, vector, part.end_ts,
                                     closed_at, _source(tp, rec))

    def _collective_vector(self, changes: Changes, cluster: str) -> np.ndarray | None:
        if cluster in changes.collective:
            return changes.collective[cluster]
        return self.store.collective_vector(cluster)

    def _publish_collective(self, changes, out, user, state, cluster, vector, end_ts,
                            closed_at, source) -> None:
        now = round(time.time(), 3)
        record = InterestVector(
            user_id=user, version=COLLECTIVE_VERSION, vector=float32_values(vector),
            dim=int(vector.shape[0]), model_version=self.model.version, produced_at=now,
            event_watermark=end_ts, collective=True, cluster=cluster)
        value = record.encode()
        changes.put_user(user, {**state, "version": COLLECTIVE_VERSION})
        changes.put_vector(user, value)
        out.append((user, value, "collective", closed_at, now, source))

    def _apply_collective(self, records, changes: Changes, out: list, publish: bool) -> None:
        latest: dict[str, CollectiveSummary] = {}
        sources: dict[str, tuple] = {}
        for rec in records:
            try:
                group = decode(CollectiveSummary, rec.value, key=rec.key,
                               max_bytes=self.s.max_payload_bytes)
            except InvalidRecord as exc:
                metrics.ERRORS.labels(kind="invalid_collective").inc()
                log.warning("collective-summaries offset %d skipped: %s", rec.offset, exc)
                continue
            latest[group.cluster] = group
            sources[group.cluster] = _source(TopicPartition(rec.topic, rec.partition), rec)
        fresh = {}
        for cluster, group in latest.items():
            stored = self.store.collective(cluster)
            if stored and stored.get("summary") == group.summary and \
                    stored.get("model_version") == self.model.version:
                continue  # seen before this start: its members were served then
            fresh[cluster] = group
        if not fresh:
            return
        clusters = list(fresh)
        try:
            vectors = self._vectors([([], fresh[c].summary) for c in clusters])
        except Exception as exc:  # noqa: BLE001 - cold start must not stop the worker
            metrics.ERRORS.labels(kind="model").inc()
            log.error("collective vectors of %s failed: %r", clusters, exc)
            return
        for cluster, vector in zip(clusters, vectors):
            group = fresh[cluster]
            changes.put_collective(cluster, {"summary": group.summary, "users": group.users,
                                             "model": group.model,
                                             "model_version": self.model.version}, vector)
            for user, info in list(self.store.members(cluster)):
                if not self._owns(user):
                    continue  # another worker's user now: it serves them
                state = self._user(changes, user)
                changes.drop_member(cluster, user)
                if state is None or state["version"] is not None or state["seq"] >= 0:
                    continue
                self._publish_collective(changes, out, user, state, cluster, vector,
                                         info["end_ts"], info["closed_at"], sources[cluster])
            log.info("collective vector of cluster %s (%d users in the summary)", cluster,
                     group.users)

    def _owns(self, user_id: str) -> bool:
        partition = key_partition(user_id.encode(), self._n_partitions)
        return TopicPartition(self.s.topic(PARTITIONS_CLOSED), partition) in \
            self.consumer.assignment()

    # --- output ----------------------------------------------------------------------------------
    def _produce(self, out: list) -> None:
        """Vectors and the batch's dead letters, every send made durable before the commit: a
        failed one is retried, dead-lettered or reported (Outbox), never a crash that replays
        it."""
        for user, value, kind, closed_at, produced_at, source in out:
            self.outbox.send(self.topic_out, user.encode(), value, source=source,
                             info=(kind, closed_at, produced_at))
        for sent, _ in self.checkpoint.make_durable():
            if sent.topic != self.topic_out:
                continue
            kind, closed_at, produced_at = sent.info
            metrics.PUBLISHED.labels(kind=kind).inc()
            if kind == "republished":
                continue
            if closed_at > 0:
                metrics.FRESHNESS.labels(kind=kind).observe(max(0.0, produced_at - closed_at))
            else:
                metrics.FRESHNESS_UNKNOWN.inc()

    def _dead_letter(self, tp, rec, reason: str, detail: str, publish: bool) -> None:
        if not publish:
            return  # restore: the previous owner dead-lettered it
        metrics.DEAD_LETTERED.labels(reason=reason).inc()
        logs.dead_letter(log, source_topic=tp.topic, partition=tp.partition, offset=rec.offset,
                         reason=reason, detail=detail)
        self.outbox.dead_letter(tp, rec.offset, rec.key, rec.value, reason, detail)

    # --- rebalances ----------------------------------------------------------------------------
    def on_revoked(self, revoked: set) -> None:
        super().on_revoked(revoked)  # every batch commits before the next poll: nothing pending
        self.checkpoint.forget(revoked)

    def restore_assigned(self, assigned: set) -> set:
        """Restore the newly assigned partitions still ours; the records polled meanwhile of
        every one of them are dropped."""
        self.restore(assigned & self.consumer.assignment())
        return assigned

    def restore(self, assigned: set) -> None:
        """Replay each newly assigned partition from our applied offset to the group's committed
        one (state only), then continue from the committed offset."""
        if not assigned:
            return
        reader = make_consumer(self.s, client_id=f"{self.s.app_id}-fusion-restore",
                               enable_auto_commit=False)
        try:
            starts = reader.beginning_offsets(list(assigned))
            for tp in sorted(assigned):
                committed = self.consumer.committed(tp)
                committed = starts[tp] if committed is None else committed
                local = self.store.offset(tp.topic, tp.partition)
                local = starts[tp] if local is None else max(local, starts[tp])
                if local < committed:
                    read = self._replay(reader, tp, local, committed)
                    metrics.RESTORED.inc(read)
                    log.info("restored %s[%d] offsets %d..%d (%d records)", tp.topic,
                             tp.partition, local, committed, read)
                self.consumer.seek(tp, committed)
        finally:
            reader.close()

    def _replay(self, reader: KafkaConsumer, tp, start: int, end: int) -> int:
        reader.assign([tp])
        reader.seek(tp, start)
        read = 0
        deadline = time.monotonic() + 120
        while reader.position(tp) < end and time.monotonic() < deadline:
            recs = [r for rs in reader.poll(timeout_ms=200).values() for r in rs if r.offset < end]
            if recs:
                self.process({tp: recs}, [], publish=False)
                read += len(recs)
        if reader.position(tp) < end:  # going on is safe (versions still only grow), but the
            # users of the unread records lack older partition summaries until their next ones
            metrics.ERRORS.labels(kind="restore_timeout").inc()
            log.error("restore of %s[%d] stopped at %d of %d after 120 s", tp.topic, tp.partition,
                      reader.position(tp), end)
        return read


def _source(tp, rec) -> tuple:
    """An input record's coordinates and bytes, for the report or dead letter of its output."""
    return (tp, rec.offset, rec.key, rec.value)


def load_model(settings: Settings):
    from models.artifact import InterestModel, default_artifact_dir
    path = settings.fusion_model_dir or default_artifact_dir(settings)
    return InterestModel.load(path)


def run(settings: Settings) -> None:
    from core.topics import create_topics
    logs.started(log, "fusion-worker", settings)
    model = load_model(settings)  # a missing artifact fails before touching Kafka
    create_topics(settings, log=log.info)
    # /metrics, consumer lag of every LIBER group, state size
    ops_metrics.start(settings, {"fusion-worker": settings.state_path / "fusion-worker"})
    FusionWorker(settings, model).run()
