"""`liber bench llm` / `summaries` on the real small model, two users, short answers."""
from __future__ import annotations

import pytest

from benchmarks import bench_llm, bench_summaries
from llm_workers import backends
from tests.conftest import base_settings


@pytest.fixture(scope="module")
def data():
    return bench_llm.partitions(base_settings(), users=2, depth=1)


def test_configurations_start_from_the_old_default_and_share_the_partitions(data):
    settings = base_settings()
    configs = bench_llm.configurations(settings)
    changes, batch, tokens = configs["old_default"]
    assert changes["llm_template"] == "uil-kar-v2" and changes["llm_dtype"] == "float32"
    assert (batch, tokens) == (8, 160) and changes["llm_no_repeat_ngram"] == 0
    assert all(c[0]["llm_template"] == f"uil-compact-{n[-2:]}" for n, c in configs.items()
               if n.endswith(("_v4", "_v5")))
    # `default` is the settings' own configuration, decided for this machine
    chosen = backends.resolve(settings)
    changes, batch, tokens = configs["default"]
    assert changes["llm_backend"] == chosen.llm_backend and batch == chosen.llm_batch_size
    assert "llm_template" not in changes and tokens == settings.llm_max_new_tokens
    assert len(data["parts"]) == 2 and all(len(p) == 1 for p in data["parts"].values())


def test_measure_counts_tokens_events_and_quality(data):
    settings = base_settings(llm_threads=1)
    events = sum(len(p.activities) for ps in data["parts"].values() for p in ps)
    out = bench_llm.measure(settings, "v3", {"llm_template": "uil-compact-v3",
                                             "llm_no_repeat_ngram": 3}, 2, 12, data,
                            log=lambda m: None)
    assert out["summaries"] == 2 and out["failed"] == 0 and out["template"] == "uil-compact-v3"
    per_1k = 1000 * 2 * (out["prompt_tokens_per_summary"] + out["answer_tokens_per_summary"]) \
        / events
    assert out["llm_tokens_per_1k_events"] == pytest.approx(per_1k, rel=0.01)
    assert 0 < out["answer_tokens_per_summary"] <= 12
    assert out["latency_p95_s"] >= out["latency_p50_s"] > 0
    assert out["quality"]["answers"] == 2 and out["quality"]["repeated_3gram_share"] == 0


def test_summaries_benchmark_reports_the_quality_figures(data):
    settings = base_settings(llm_threads=1, llm_max_new_tokens=12)
    out = bench_summaries.run(settings, users=2, depth=1, log=lambda m: None)
    assert out["partitions"] == 2 and len(out["examples"]) == 2
    assert {"repeated_3gram_share", "distinct_2", "invented_title_share", "genre_precision",
            "mean_words"} <= set(out)
    assert all(e.startswith("SUMMARY: Likes") for e in out["examples"])


def test_stream_mix_counts_every_partition_with_and_without_the_floor():
    settings = base_settings()
    mix = bench_llm.stream_mix(settings, {"uil-compact-v5": 50.0, "uil-kar-v2": 100.0}, users=20)
    floor, no_floor = mix["floor"], mix["no_floor"]
    assert floor["min_gap_events"] == settings.min_gap_events > 1 == no_floor["min_gap_events"]
    # the floor leaves fewer, larger partitions of the same events
    assert floor["partitions"] < no_floor["partitions"]
    assert floor["events_per_partition"] > no_floor["events_per_partition"]
    for row in (floor, no_floor):
        assert row["uil-compact-v5"] < row["uil-kar-v2"]
    assert floor["uil-compact-v5"] < no_floor["uil-compact-v5"]
