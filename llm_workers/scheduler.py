"""Which partitions go to the LLM next: per-user order, micro-batches, retries, token budget.

Pure logic (no Kafka, no model) so that it can be tested alone.

- Each key (a user, or a cluster for collective jobs) has a FIFO queue; only its head may run,
  and only one job per key is in flight: summary n exists before n+1's prompt is built.
- A batch takes the ready heads of up to `max_batch` keys. It leaves when it is full or when the
  oldest ready head has waited `max_wait_s`. A job that failed before goes alone (a poison
  prompt must not fail its neighbours again) once its backoff has passed.
- Token budget (tokens per minute, sliding window): a batch is cut to what the budget allows;
  when the ready heads need more than is left, the most active keys (most events waiting) go
  first. Nothing is dropped: jobs wait in their queues (and the consumer pauses when they fill).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable


@dataclass(eq=False)
class Job:
    key: str                       # serialisation key: user id, or "\0cluster:<name>"
    kind: str                      # "partition" or "collective"
    arrived: float
    record: object = None          # ClosedPartition for partition jobs
    source: tuple | None = None    # (TopicPartition, offset, raw key, raw value)
    closed_at: float = 0.0         # Kafka timestamp of the partition record (s): freshness start
    cluster: str = ""
    weight: int = 1                # events carried (activity for the budget order)
    attempts: int = 0
    not_before: float = 0.0
    prompt: object = None          # ChatPrompt, built when the job first reaches the head
    context: str = ""              # what the prompt used as previous state
    previous: str | None = None    # that text (the parser's fallback needs it)
    estimate: int = 0              # prompt tokens + max_new_tokens
    cancelled: bool = False
    last_error: str = ""


class TokenBudget:
    """Tokens (in + out) per sliding minute; `per_minute` 0 means unlimited."""

    def __init__(self, per_minute: int, window_s: float = 60.0, clock=time.monotonic):
        self.per_minute = per_minute
        self.window_s = window_s
        self.clock = clock
        self._spent: deque[list] = deque()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def used(self, now: float | None = None) -> int:
        now = self.clock() if now is None else now
        while self._spent and self._spent[0][0] <= now - self.window_s:
            self._spent.popleft()
        return sum(entry[1] for entry in self._spent)

    def remaining(self, now: float | None = None) -> int:
        return self.per_minute - self.used(now) if self.enabled else 1 << 62

    def allows(self, tokens: int, now: float | None = None) -> bool:
        """Within budget, or nothing spent in the window (a job bigger than the whole budget
        must still run one day)."""
        if not self.enabled:
            return True
        used = self.used(now)
        return used == 0 or used + tokens <= self.per_minute

    def spend(self, tokens: int, now: float | None = None) -> list:
        """Reserve an estimate now; `settle` replaces it with what the call really used."""
        entry = [self.clock() if now is None else now, tokens]
        self._spent.append(entry)
        return entry

    @staticmethod
    def settle(entry: list, tokens: int) -> None:
        entry[1] = tokens


class Scheduler:
    def __init__(self, max_batch: int, max_wait_s: float):
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queues: dict[str, deque[Job]] = {}
        self._busy: set[str] = set()
        self._size = 0
        self.throttled = False  # the last round was held back by the budget

    def __len__(self) -> int:
        return self._size

    def add(self, job: Job) -> None:
        self._queues.setdefault(job.key, deque()).append(job)
        self._size += 1

    def backlog(self, key: str) -> int:
        return sum(job.weight for job in self._queues.get(key, ()))

    def heads(self, now: float) -> list[Job]:
        """Jobs that may start now: the head of each idle key whose backoff has passed."""
        return [q[0] for key, q in self._queues.items()
                if key not in self._busy and q and q[0].not_before <= now]

    def next_batch(self, now: float, prepare: Callable[[Job], int],
                   budget: TokenBudget | None = None) -> list[Job]:
        """The next batch (marked in flight), or [] to wait. `prepare(job)` builds the job's
        prompt once and returns its token estimate."""
        self.throttled = False
        heads = self.heads(now)
        if not heads:
            return []
        retries = [job for job in heads if job.attempts > 0]
        if retries:
            candidates = [min(retries, key=lambda j: (j.not_before, j.arrived))]
        else:
            if len(heads) < self.max_batch and now - min(j.arrived for j in heads) < self.max_wait_s:
                return []
            candidates = heads
        for job in candidates:
            if not job.estimate:
                job.estimate = prepare(job)
        if budget is not None and budget.enabled and \
                sum(j.estimate for j in candidates) > budget.remaining(now):
            candidates.sort(key=lambda j: (-self.backlog(j.key), j.arrived))  # most active first
        else:
            candidates.sort(key=lambda j: j.arrived)
        limited = budget is not None and budget.enabled
        used = budget.used(now) if limited else 0
        batch, tokens = [], 0
        for job in candidates[: self.max_batch]:
            # within budget; or alone in an empty window (an oversized job must run one day)
            if limited and used + tokens + job.estimate > budget.per_minute and (batch or used):
                break
            batch.append(job)
            tokens += job.estimate
        if not batch:
            self.throttled = True
            return []
        for job in batch:
            self._busy.add(job.key)
        return batch

    def finish(self, job: Job) -> None:
        """The job is done (or given up): its key's next job becomes the head."""
        queue = self._queues.get(job.key)
        if queue and queue[0] is job:
            queue.popleft()
            self._size -= 1
            if not queue:
                del self._queues[job.key]
        self._busy.discard(job.key)

    def retry_later(self, job: Job, not_before: float) -> None:
        """A failed try: the job stays at the head of its key, idle until `not_before`."""
        job.not_before = not_before
        self._busy.discard(job.key)

    def drop(self, predicate: Callable[[Job], bool]) -> list[Job]:
        """Remove matching jobs (revoked partitions); in-flight ones are marked cancelled."""
        dropped = []
        for key in list(self._queues):
            queue = self._queues[key]
            keep = deque(job for job in queue if not predicate(job))
            for job in queue:
                if predicate(job):
                    job.cancelled = True
                    dropped.append(job)
            self._size -= len(queue) - len(keep)
            if keep and queue[0] is not keep[0]:
                self._busy.discard(key)
            if keep:
                self._queues[key] = keep
            else:
                del self._queues[key]
                self._busy.discard(key)
        return dropped
