"""DARE inside the transformers backend (LIBER_LLM_DARE=1) on the real SmolLM2-135M-Instruct:
strict output is the plain backend's output token for token (without and with a repetition
penalty, LineGuide on), relaxed output keeps the labelled lines the worker parses, the pools grow
with each call and come back when the backend is reopened on the same state directory."""
from __future__ import annotations

import pytest
import torch

from core.settings import Settings
from llm_workers import backends, prompts
from llm_workers.dare.decoder import DareDecoder
from llm_workers.prompts import Activity
from tests.conftest import base_settings

MAX_NEW = 40
PARTITIONS = [
    ([("Toy Story (1995)", "Animation|Children's|Comedy", 5), ("Aladdin (1992)", "Animation|Children's|Comedy|Musical", 4),
      ("Heat (1995)", "Action|Crime|Thriller", 2), ("Sabrina (1995)", "Comedy|Romance", 3)], None),
    ([("Alien (1979)", "Action|Horror|Sci-Fi|Thriller", 5), ("Blade Runner (1982)", "Film-Noir|Sci-Fi", 5),
      ("Groundhog Day (1993)", "Comedy|Romance", 2)], "Likes animated family comedies."),
    ([("Babe (1995)", "Children's|Comedy|Drama", 4), ("Jumanji (1995)", "Adventure|Children's|Fantasy", 5),
      ("Fargo (1996)", "Crime|Drama|Thriller", 1)], "Likes science fiction and thrillers."),
]


def _prompts() -> list[prompts.ChatPrompt]:
    out = []
    for items, previous in PARTITIONS:
        acts = [Activity(f"{title} [{genres}]", "rate", float(r)) for title, genres, r in items]
        kind = prompts.CONTEXT_PREVIOUS if previous else prompts.CONTEXT_NONE
        out.append(prompts.cascade_prompt(acts, context=previous, context_kind=kind))
    return out


def _settings(tmp_path, **overrides) -> Settings:
    return base_settings(llm_threads=1, state_dir=str(tmp_path / "state"), **overrides)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    backend = backends.create(_settings(tmp_path_factory.mktemp("plain")))
    assert backend.dare is None                      # DARE is opt-in (LIBER_LLM_DARE=1)
    gens = backend.generate(_prompts(), MAX_NEW)     # one batch, as the worker calls it
    yield backend, gens
    backend.close()


def _open(tmp_path, mode: str):
    backend = backends.create(_settings(tmp_path, llm_dare=1, dare_mode=mode))
    assert backend.dare is not None and backend.dare.mode == mode
    return backend


def test_strict_is_the_plain_backend_output(plain, tmp_path):
    _, expected = plain
    backend = _open(tmp_path, "strict")
    try:
        gens = backend.generate(_prompts(), MAX_NEW)
        for got, want in zip(gens, expected):
            assert (got.text, got.tokens_out, got.tokens_in, got.finished) == \
                (want.text, want.tokens_out, want.tokens_in, want.finished)
        counts = backend.dare.decoder.stats.snapshot()["strict"]
        accepted = sum(row["accepted_tokens"] for pool, row in counts.items() if pool != "*")
        assert accepted > 0        # drafts were verified and kept: the identity is not vacuous
    finally:
        backend.close()


def test_strict_is_the_plain_output_with_a_repetition_penalty(tmp_path):
    """LIBER_LLM_REPETITION_PENALTY=1.15 (off by default) in both paths."""
    penalty = dict(llm_repetition_penalty=1.15)
    plain = backends.create(_settings(tmp_path / "plain", **penalty))
    strict = backends.create(_settings(tmp_path / "strict", llm_dare=1, dare_mode="strict",
                                       **penalty))
    try:
        assert plain.repetition_penalty == strict.repetition_penalty == 1.15
        want = plain.generate(_prompts(), MAX_NEW)
        got = strict.generate(_prompts(), MAX_NEW)
        assert [g.text for g in got] == [w.text for w in want]
    finally:
        plain.close()
        strict.close()


def test_relaxed_keeps_the_labelled_lines(plain, tmp_path):
    backend = _open(tmp_path, "relaxed")
    try:
        for p, g in zip(_prompts(), backend.generate(_prompts(), MAX_NEW)):
            heads = [line.split(":")[0] for line in (p.prefix + g.text).strip().split("\n")]
            assert heads == list(p.structure), g.text
            assert (p.prefix + g.text).split("\n")[1].startswith(p.line_head(1))
            parsed = prompts.parse(p.prefix + g.text)     # the worker's parser
            assert all(parsed[label] for label in p.structure)
    finally:
        backend.close()


def test_pools_grow_and_survive_reopening(tmp_path):
    first = _open(tmp_path, "strict")
    p = _prompts()[1]
    try:
        assert first.dare.store.stats() == {}
        text = first.generate([p], MAX_NEW)[0].text
        pools = first.dare.pools(first._tok(first.render(p), add_special_tokens=False).input_ids)
        assert {"genre:Sci-Fi", "genre:Action"} <= set(pools)   # from the prompt's items
        stats = first.dare.store.stats()
        assert set(stats) == set(pools) and all(s["sequences"] == 1 for s in stats.values())
        with pytest.raises(backends.BackendError, match="DARE"):
            _open(tmp_path, "strict")                     # one process per pool store
    finally:
        first.close()
    again = _open(tmp_path, "strict")
    try:
        assert again.dare.store.stats() == stats          # reloaded from RocksDB
        assert again.generate([p], MAX_NEW)[0].text == text
        counts = again.dare.decoder.stats.snapshot()["strict"]
        from_pools = sum(row["accepted_tokens"] for pool, row in counts.items()
                         if pool.startswith("genre:"))
        assert from_pools >= MAX_NEW // 2                 # warm: drafted from the reloaded pools
        assert all(s["sequences"] == 2 for s in again.dare.store.stats().values())
    finally:
        again.close()


def test_time_limit_and_close(tmp_path):
    backend = _open(tmp_path, "relaxed")
    try:
        with pytest.raises(backends.LLMTimeout):
            backend.generate(_prompts()[:2], 400, timeout_s=0.05)
        assert backend.dare.store.stats() == {}           # unfinished answers are not fed
    finally:
        backend.close()
    with pytest.raises(backends.LLMError, match="closed"):
        backend.generate(_prompts()[:1], 8)


def test_decoder_with_processors_is_generate_with_processors(plain):
    """The decoder-level identity behind the backend's: DARE strict with a processor list equals
    `model.generate(..., logits_processor=...)`, also when the pool drafts whole answers."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
    from llm_workers.dare.pools import PoolStore
    backend, _ = plain
    model, tok = backend._model, backend._tok
    vocab = model.get_output_embeddings().weight.shape[0]
    store = PoolStore()
    decoder = DareDecoder(model, store, "strict", draft_len=8, eos_token_ids=backend.eos_ids)
    for i, p in enumerate(_prompts()[:2]):
        ids = tok(backend.render(p), add_special_tokens=False).input_ids

        def processors():
            return LogitsProcessorList([
                RepetitionPenaltyLogitsProcessor(1.15),
                backends.LineGuide(tok, [p], MAX_NEW, backend.eos_ids[0], len(ids), vocab)])
        x = torch.tensor([ids])
        with torch.inference_mode():
            ref = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=MAX_NEW, eos_token_id=backend.eos_ids,
                                 pad_token_id=backend.pad_id, logits_processor=processors(),
                                 temperature=None, top_p=None, top_k=None)[0, len(ids):].tolist()
        gen = decoder.generate(ids, ["all"], MAX_NEW, feed=True, logits_processor=processors())
        assert gen.tokens == ref
        if i == 0:                 # the same prompt again: the pool holds its whole answer
            again = decoder.generate(ids, ["all"], MAX_NEW, logits_processor=processors())
            assert again.tokens == ref and again.accepted_tokens >= len(ref) // 2
