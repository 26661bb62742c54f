"""`liber bench llm` / `summaries` on the real small model, two users, short answers."""
from __future__ import annotations

import pytest

from benchmarks import bench_llm, bench_summaries
from core.settings import Settings


@pytest.fixture(scope="module")
def data():
    return bench_llm.partitions(Settings.load(env={}), users=2, depth=1)


def test_configurations_start_from_the_old_default_and_share_the_partitions(data):
    settings = Settings.load(env={})
    configs = bench_llm.configurations(settings)
    changes, batch, tokens = configs["old_default"]
    assert changes["llm_template"] == "uil-kar-v2" and changes["llm_dtype"] == "float32"
    assert (batch, tokens) == (8, 160) and changes["llm_no_repeat_ngram"] == 0
    assert all(c[0]["llm_template"] == "uil-compact-v3" for n, c in configs.items()
               if n.endswith("_v3"))
    assert len(data["parts"]) == 2 and all(len(p) == 1 for p in data["parts"].values())


def test_measure_counts_tokens_events_and_quality(data):
    settings = Settings.load(env={}, llm_threads=1)
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
    settings = Settings.load(env={}, llm_threads=1, llm_max_new_tokens=12)
    out = bench_summaries.run(settings, users=2, depth=1, log=lambda m: None)
    assert out["partitions"] == 2 and len(out["examples"]) == 2
    assert {"repeated_3gram_share", "distinct_2", "invented_title_share", "genre_precision",
            "mean_words"} <= set(out)
    assert all(e.startswith("SUMMARY: Likes") for e in out["examples"])
