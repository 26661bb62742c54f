"""The soak's event plan (`liber chaos --soak`): growing or fixed population. The soak itself
is a load run (`liber chaos --soak`), not a test. And the faults of `liber chaos` that
tests/reliability/test_faults.py leaves out, reduced to a few MovieLens users on the session
broker."""
import threading
import time

import pytest

from liber import chaos
from liber.chaos import soak_events, users_seen
from ops.local_kafka import LocalKafka
from streams import movielens
from tests.chaos_checks import assert_invariants
from tests.conftest import base_settings


@pytest.fixture(scope="module")
def ml1m():
    data_dir = movielens.fetch(base_settings().home, datasets=("ml-1m",), log=lambda m: None)
    return movielens.load_ratings(data_dir["ml-1m"], "ml-1m")


def test_fixed_population_soak_repeats_the_same_users_in_laps(ml1m):
    events, laps = soak_events(ml1m, 40_000, users=50)
    population = {e.user_id for e in events if "#" not in e.event_id}
    assert len(events) == 40_000 and len(population) == 50
    assert {e.user_id for e in events} == population  # no new users in later laps
    assert laps == 1 + max(int(e.event_id.rsplit("#", 1)[1]) for e in events if "#" in e.event_id)
    assert laps > 2 and len({e.event_id for e in events}) == len(events)
    seen = users_seen(events)
    assert seen[-1] == 50 and seen[len(events) // 2] == 50


def test_growing_population_soak_is_ml1m_in_time_order(ml1m):
    events, laps = soak_events(ml1m, 20_000)
    assert laps == 1 and all("#" not in e.event_id for e in events)
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    seen = users_seen(events)
    assert seen[0] == 0 and seen[-1] == len({e.user_id for e in events})
    assert all(a <= b for a, b in zip(seen, seen[1:])) and seen[-1] > seen[len(seen) // 2]


# --- the faults of `liber chaos` that tests/reliability/test_faults.py leaves out, reduced ---
def run_reduced(fault, settings, kafka, tmp_path, *, max_events, **kw):
    """One fault on the session broker; the invariants must hold whatever the fault was."""
    # gap and span closes off: a partition every `max_events` events of a user, so the test
    # knows how many LLM calls the run makes
    settings = settings.replace(max_events=max_events, max_gap_s=1e9, max_span_s=1e9)
    try:
        result = chaos.run_fault(fault, settings, kafka, tmp_path, replay_s=6.0, drain_s=300,
                                 log=lambda m: None, **kw)
    finally:
        chaos.stop_all()  # a run that raised leaves its workers running
    report = assert_invariants(result)
    assert report["partitions"] > 0 and report["unsummarised"] == 0
    return result


class WatchedBroker:
    """The session broker as `chaos.inject` sees it, noting what each stop and start did (the
    fault must have taken the broker down, not just called a method)."""

    def __init__(self, broker: LocalKafka):
        self.broker = broker
        self.pids = [broker.pid()]
        self.down_after_stop: list[bool] = []

    def __getattr__(self, name):
        return getattr(self.broker, name)

    def stop(self, **kw):
        self.broker.stop(**kw)
        self.down_after_stop.append(not self.broker.running() and not self.broker.healthy())

    def start(self, **kw):
        self.broker.start(**kw)
        self.pids.append(self.broker.pid())
        return self


@pytest.mark.kafka
@pytest.mark.reliability
def test_broker_restart_mid_replay_loses_nothing(settings, kafka, tmp_path):
    broker = WatchedBroker(kafka)
    try:
        # 120 events: the replay sends them in three chunks, the fault comes after the first
        result = run_reduced("broker_restart", settings, broker, tmp_path, users=3,
                             per_user=40, max_events=40)
    finally:
        if not kafka.running():  # the session's other tests need it
            kafka.start(log=lambda m: None)
    # down (no process, no answer) while the replay still had events to send, then a new
    # process on the same data
    assert 0 < result["injected"]["at_events_in"] < result["events_sent"], result["injected"]
    assert broker.down_after_stop == [True], broker.down_after_stop
    assert len(set(broker.pids)) == 2 and None not in broker.pids, broker.pids
    assert result["invariants"]["summaries"] == result["invariants"]["partitions"] == 3


class LastLook(threading.Thread):
    """Scrapes the first LLM worker process until it is gone: what it held and had summarised
    just before the kill (chaos's own figures say when, not whether a call was in flight)."""

    def __init__(self):
        super().__init__(daemon=True, name="last-look")
        self.held = self.summaries = None
        self.done = threading.Event()
        self._earlier = list(chaos._LIVE)  # workers of earlier runs in this session

    def run(self) -> None:
        while not self.done.is_set():
            llm = next((p for p in chaos._LIVE if p.command == "llm-worker" and
                        all(p is not q for q in self._earlier)), None)
            if llm is not None:
                if llm.starts > 1:
                    return
                held = llm.metric("liber_llm_queue_depth")
                summaries = llm.metric("liber_llm_summaries_total")
                if held is not None and summaries is not None:
                    self.held, self.summaries = held, summaries
            time.sleep(0.1)


@pytest.mark.kafka
@pytest.mark.reliability
def test_kill_9_of_the_llm_worker_mid_batch_loses_nothing(settings, kafka, tmp_path):
    look = LastLook()
    look.start()
    try:
        # one user: one prompt per call, its four partitions one after the other
        result = run_reduced("kill_llm_worker", settings, kafka, tmp_path, users=1,
                             per_user=46, max_events=10)
    finally:
        look.done.set()
        look.join(5)
    injected, report = result["injected"], result["invariants"]
    assert report["partitions"] == 4 and report["summaries"] == 4, report
    # killed once a call had ended, halfway through the next: a partition still held and
    # not summarised
    assert injected["at_summaries"] >= 2 and injected["into_batch_s"] > 0, injected
    assert look.summaries == injected["at_summaries"] and look.held >= 1, vars(look)
    # then a second process (its counters start from zero) did the rest
    logs = sorted(p.name for p in (tmp_path / "logs" / "kill_llm_worker").glob("llm-worker-*"))
    assert logs == ["llm-worker-1.log", "llm-worker-2.log"], logs
    after = result["llm_worker_counts_last_process"]["summaries"]
    assert after == report["summaries"] - injected["at_summaries"], (after, injected)


@pytest.mark.kafka
@pytest.mark.reliability
def test_slow_llm_pauses_the_consumer_and_the_lag_drains(settings, kafka, tmp_path):
    # twelve partitions, three for each of four users, against a queue of 8
    result = run_reduced("slow_llm", settings, kafka, tmp_path, users=4, per_user=30,
                         max_events=10)
    assert result["invariants"]["partitions"] == 12, result["invariants"]
    # the held calls filled the queue: the consumer paused, the queue stayed bounded, the
    # LLM group fell behind and caught up
    assert result["llm_paused_seen"], result
    assert result["queue_bounded"] and result["llm_queue_max"] >= 8, result
    assert result["llm_lag_max"] > 0 and result["llm_lag_final"] == 0, result
