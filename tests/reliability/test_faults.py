"""The cheapest faults of `liber chaos`, reduced to a few MovieLens users, on the session broker:
the workers run as real child processes, the invariants are read back from the topics."""
from __future__ import annotations

import pytest

from liber import chaos
from tests.chaos_checks import assert_invariants

pytestmark = [pytest.mark.kafka, pytest.mark.reliability]


def run(fault, settings, kafka, tmp_path, **kw):
    result = chaos.run_fault(fault, settings, kafka, tmp_path, replay_s=6.0, drain_s=300,
                             log=lambda m: None, **kw)
    assert_invariants(result)
    return result


def test_kill_9_of_the_stream_worker_loses_nothing(settings, kafka, tmp_path):
    result = run("kill_stream_worker", settings, kafka, tmp_path, users=5, per_user=30,
                 with_llm=False)
    assert 0 < result["injected"]["at_events_in"] < result["events_sent"]
    assert result["invariants"]["partitions"] > 0


def test_llm_errors_and_timeouts_are_retried_or_dead_lettered(settings, kafka, tmp_path):
    result = run("llm_errors", settings, kafka, tmp_path, users=2, per_user=20)
    report = result["invariants"]
    # the fault must have fired: a failed call (error or timeout) and its retry, counted by the
    # LLM worker (otherwise the run proves nothing about retries)
    counts = result["llm_worker_counts_last_process"]
    assert counts["errors"] >= 1 and counts["retries"] >= 1, counts
    assert report["partitions"] > 0 and report["unsummarised"] == 0
    assert report["summaries"] + report["llm_dead_lettered"] >= report["partitions"]
