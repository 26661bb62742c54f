"""Scheduler: per-user order, micro-batches, solo retries, token budget, commit offsets."""
from __future__ import annotations

from llm_workers.scheduler import Job, Scheduler, TokenBudget
from state.checkpoint import Offsets


def job(user: str, t: float, weight: int = 1, seq: int = 0) -> Job:
    return Job(key=user, kind="partition", arrived=t, weight=weight, record=seq)


def prepare(cost: int = 100):
    def f(j: Job) -> int:
        return cost
    return f


def test_one_job_per_user_in_flight_and_in_order():
    s = Scheduler(max_batch=8, max_wait_s=0.0)
    a0, a1, b0 = job("a", 0, seq=0), job("a", 1, seq=1), job("b", 2)
    for j in (a0, a1, b0):
        s.add(j)
    batch = s.next_batch(10, prepare())
    assert batch == [a0, b0]  # a1 waits for a0: its prompt needs a0's summary
    assert s.next_batch(10, prepare()) == []
    s.finish(a0)
    assert s.next_batch(10, prepare()) == [a1]
    s.finish(b0)
    s.finish(a1)
    assert len(s) == 0 and s.next_batch(10, prepare()) == []


def test_batch_waits_for_size_or_max_wait():
    s = Scheduler(max_batch=3, max_wait_s=1.0)
    s.add(job("a", 0.0))
    s.add(job("b", 0.5))
    assert s.next_batch(0.9, prepare()) == []          # not full, oldest waited 0.9 s
    assert len(s.next_batch(1.0, prepare())) == 2      # max wait reached
    s2 = Scheduler(max_batch=2, max_wait_s=60)
    for u in "abc":
        s2.add(job(u, 0.0))
    assert [j.key for j in s2.next_batch(0.1, prepare())] == ["a", "b"]  # full batch goes at once


def test_failed_job_retries_alone_after_backoff_and_others_go_on():
    s = Scheduler(max_batch=4, max_wait_s=0.0)
    a, b, c = job("a", 0), job("b", 0), job("c", 0)
    for j in (a, b, c):
        s.add(j)
    assert s.next_batch(0, prepare()) == [a, b, c]
    a.attempts = 1
    s.retry_later(a, not_before=5.0)
    s.finish(b)
    s.finish(c)
    b2 = job("b", 1)
    s.add(b2)
    assert s.next_batch(1, prepare()) == [b2]          # a is backing off, b is not held up
    s.finish(b2)
    s.add(job("c", 6))
    assert s.next_batch(6, prepare()) == [a]           # the retry goes alone
    s.finish(a)
    assert [j.key for j in s.next_batch(6, prepare())] == ["c"]


def test_budget_queues_most_active_first_and_never_drops():
    clock = [0.0]
    budget = TokenBudget(per_minute=250, clock=lambda: clock[0])
    s = Scheduler(max_batch=8, max_wait_s=0.0)
    s.add(job("quiet", 0, weight=2))
    for i in range(3):
        s.add(job("busy", 1 + i, weight=20))
    s.add(job("medium", 0.5, weight=10))
    batch = s.next_batch(0, prepare(100), budget)
    assert [j.key for j in batch] == ["busy", "medium"]  # 3 heads need 300 > 250: by backlog
    budget.spend(200, 0)
    for j in batch:
        s.finish(j)
    assert s.next_batch(1, prepare(100), budget) == [] and s.throttled  # 200 + 100 > 250
    clock[0] = 61.0
    batch = s.next_batch(61, prepare(100), budget)
    assert [j.key for j in batch] == ["quiet", "busy"]  # both fit: arrival order
    assert len(s) == 3  # nothing dropped: busy's later jobs and quiet are still there
    huge = TokenBudget(per_minute=10, clock=lambda: 0.0)
    assert huge.allows(1000)  # an empty window lets one oversized call through


def test_budget_settles_to_actual_tokens_and_slides():
    clock = [0.0]
    b = TokenBudget(100, clock=lambda: clock[0])
    entry = b.spend(90)
    assert not b.allows(20)
    b.settle(entry, 30)
    assert b.allows(20) and b.used() == 30
    clock[0] = 60.0
    assert b.used() == 0 and b.remaining() == 100
    assert TokenBudget(0).allows(10 ** 9)


def test_drop_cancels_in_flight_and_frees_the_user():
    s = Scheduler(max_batch=4, max_wait_s=0.0)
    a0, a1 = job("a", 0), job("a", 1)
    a0.source, a1.source = ("tp0", 1), ("tp1", 2)
    s.add(a0)
    s.add(a1)
    assert s.next_batch(0, prepare()) == [a0]
    dropped = s.drop(lambda j: j.source[0] == "tp0")
    assert dropped == [a0] and a0.cancelled and len(s) == 1
    assert s.next_batch(5, prepare()) == [a1]


def test_offsets_commit_below_the_oldest_pending_record():
    o = Offsets()
    for off in (5, 6, 7):
        o.received("tp", off)
    o.done("tp", 6)
    assert o.committable() == {"tp": 5}
    o.done("tp", 5)
    assert o.committable() == {"tp": 7}
    o.done("tp", 7)
    assert o.committable() == {"tp": 8}
    o.forget(["tp"])
    assert o.committable() == {}
