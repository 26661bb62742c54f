"""Batch UIL with the real SmolLM2: the worker's prompts and parser, depth order, the cache."""
import pytest

from llm_workers import backends, prompts
from llm_workers.prompts import Activity
from models.summaries_batch import BatchPartition, BatchSummariser, SummaryCache
from tests.conftest import base_settings


def _part(user, seq, titles):
    acts = tuple(Activity(f"{t} (1995) [Comedy]", "rate", float(v)) for t, v in titles)
    return BatchPartition(user, seq, acts, 1000.0 * (seq + 1))


PARTS = {
    "7": [_part("7", 0, [("Toy Story", 5), ("Babe", 4)]), _part("7", 1, [("Heat", 2)])],
    "8": [_part("8", 0, [("Casino", 5)])],
}


@pytest.fixture(scope="module")
def backend():
    s = base_settings()
    return backends.TransformersBackend(s.home, s.llm_model, threads=s.llm_threads,
                                        repetition_penalty=s.llm_repetition_penalty)


def test_cascade_then_cached_rerun(tmp_path, backend):
    settings = base_settings()
    cache = SummaryCache(tmp_path / "cache.sqlite")
    summariser = BatchSummariser(settings, max_new_tokens=24, batch_size=4, backend=backend,
                                 cache=cache)
    out, stats = summariser.run(PARTS, "cascade")
    assert [len(out["7"]), len(out["8"])] == [2, 1]
    assert stats.prompts == 3 and stats.generated == 3 and stats.cached == 0
    assert stats.calls == 2  # depth 0 (both users in one call), then depth 1
    for s in out["7"] + out["8"]:   # the forced lines make every answer parse
        assert s is not None and s.partition_summary and s.cascaded_summary
    assert stats.tokens_out > 0 and stats.tokens_in > 3 * 50
    again, stats2 = BatchSummariser(settings, max_new_tokens=24, batch_size=4, backend=backend,
                                    cache=cache).run(PARTS, "cascade")
    assert again == out and stats2.cached == 3 and stats2.generated == 0 and stats2.calls == 0
    # another generation cap is another key: nothing reused
    _, stats3 = BatchSummariser(settings, max_new_tokens=20, batch_size=4, backend=backend,
                                cache=cache).run({"8": PARTS["8"]}, "cascade")
    assert stats3.generated == 1 and stats3.cached == 0


def test_cascade_prompt_carries_the_previous_profile(tmp_path, backend):
    seen = []

    class Recording(backends.Backend):
        name, model = backend.name, backend.model

        def generate(self, prompts_, max_new_tokens, *, timeout_s=None):
            seen.append(list(prompts_))
            return backend.generate(prompts_, max_new_tokens, timeout_s=timeout_s)

        def count_tokens(self, prompt):
            return backend.count_tokens(prompt)

    summariser = BatchSummariser(base_settings(), max_new_tokens=16, backend=Recording(),
                                 cache=SummaryCache(tmp_path / "c.sqlite"))
    out, _ = summariser.run({"7": PARTS["7"]}, "cascade")
    first, second = seen[0][0], seen[1][0]
    assert first.user.startswith("Previous profile: none")   # a new user: no context
    assert out["7"][0] is not None
    assert prompts.clean_text(out["7"][0].cascaded_summary, 600)[:40] in second.user
    naive_out, naive_stats = summariser.run({"7": PARTS["7"]}, "naive")
    assert naive_stats.generated == 2 and len(naive_out["7"]) == 2
    assert any("Earlier activity (2 items)" in p.user for p in seen[-1])
    # naive summaries stand alone: only the partitions asked for are written
    only, only_stats = summariser.run({"7": PARTS["7"]}, "naive", only={"7": {1}})
    assert only_stats.prompts == 1 and only["7"][0] is None and only["7"][1] == naive_out["7"][1]


def test_partitions_must_be_in_seq_order(tmp_path):
    summariser = BatchSummariser(base_settings(), cache=SummaryCache(tmp_path / "c.sqlite"))
    with pytest.raises(ValueError, match="seq"):
        summariser.run({"7": [PARTS["7"][1]]}, "cascade")
    with pytest.raises(ValueError, match="mode"):
        summariser.run(PARTS, "other")


def test_cache_keys_tell_relaxed_dare_answers_from_greedy_ones():
    """Strict DARE answers equal greedy ones and may share the cache; relaxed ones may not."""
    from models.summaries_batch import _BackendId, _key
    prompt = prompts.ChatPrompt("system", "user")

    def key(**overrides):
        s = base_settings().replace(**overrides)
        return _key("cascade", _BackendId(s), s, 64, "7", 0, prompt)

    plain = key()
    assert key(llm_dare=1, dare_mode="strict") == key(llm_dare=1, dare_mode="off") == plain
    relaxed = key(llm_dare=1, dare_mode="relaxed")
    assert relaxed != plain
    assert key(llm_dare=1, dare_mode="relaxed", dare_top_k=3) != relaxed
    assert key(dare_mode="relaxed") == plain  # DARE not switched on in the backend
