"""DARE's vLLM proposer without an engine: pools chosen from what a prompt carries, and feeding.

The real tokenizer of SmolLM2-135M-Instruct and real RocksDB pools; the engine-side tests are in
tests/llm_workers/backends/test_vllm.py.
"""
from __future__ import annotations

import pytest

from llm_workers import model_store, prompts
from llm_workers.dare import uil_prompts, vllm_proposer
from llm_workers.dare.pools import PoolStore
from llm_workers.dare.routing import PoolRouter
from llm_workers.prompts import Activity
from llm_workers.backends.vllm import render
from tests.conftest import base_settings

VOCAB = ["Action", "Children's", "Comedy", "Crime", "Drama", "Romance", "Thriller"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_store.model_dir(base_settings().home)))


def _ids(tokenizer, prompt) -> list[int]:
    return tokenizer(render(tokenizer, prompt), add_special_tokens=False).input_ids


def test_pools_come_from_the_prompt_text(tokenizer, tmp_path):
    store = PoolStore(str(tmp_path / "pools"))
    # two clusters: crime lovers and family viewers (centroids over VOCAB)
    router = PoolRouter([[0.5, 0, 0, 0.7, 0, 0, 0.5], [0, 0.7, 0.7, 0, 0, 0, 0]])
    store.put_meta(vllm_proposer.ROUTER_META, router.to_meta())
    store.put_meta(vllm_proposer.VOCAB_META, VOCAB)
    pr = vllm_proposer.PromptRouter(tokenizer, store, genre_pools=2)
    crime = prompts.cascade_prompt(
        [Activity("Heat (1995) [Action|Crime|Thriller]", "rate", 5.0),
         Activity("Se7en (1995) [Crime|Thriller]", "rate", 4.0)],
        context="Likes crime films.", context_kind=prompts.CONTEXT_PREVIOUS)
    ids = _ids(tokenizer, crime)
    assert pr.pools(ids) == ["cluster:0", "genre:Crime", "genre:Thriller"]
    # the answer so far does not change the routing (only the prompt part is read)
    answer = tokenizer(" thrillers [Comedy|Comedy|Comedy]", add_special_tokens=False).input_ids
    assert pr.prompt_end(ids + answer) == pr.prompt_end(ids) < len(ids)
    assert pr.pools(ids + answer) == pr.pools(ids)
    # the benchmark's own prompt shape routes the same way
    kids = uil_prompts.prompt_ids(tokenizer, [("Babe (1995)", ["Children's", "Comedy"], 4.0),
                                              ("Toy Story (1995)", ["Children's", "Comedy"], 5.0)],
                                  None)
    assert pr.pools(kids) == ["cluster:1", "genre:Children's", "genre:Comedy"]
    # no genres in the prompt: no pool (drafts come from the request's own text only)
    assert pr.pools(_ids(tokenizer, "Say hello.")) == []
    store.close()


def test_bare_titles_route_by_the_genre_line():
    """uil-kar-v2 and v3 tag each item with its genres; v4 lists them once, most frequent first."""
    acts = [Activity("Heat (1995) [Action|Crime|Thriller]", "rate", 5.0),
            Activity("Se7en (1995) [Crime|Thriller]", "rate", 4.0),
            Activity("Babe (1995) [Children's|Comedy]", "rate", 1.0)]
    tagged = prompts.cascade_prompt(acts, context=None, context_kind=prompts.CONTEXT_NONE,
                                    template=prompts.COMPACT_V3)
    bare = prompts.cascade_prompt(acts, context=None, context_kind=prompts.CONTEXT_NONE,
                                  template=prompts.COMPACT_V4)
    assert vllm_proposer.prompt_genres(tagged.user) == [
        ["Action", "Crime", "Thriller"], ["Crime", "Thriller"], ["Children's", "Comedy"]]
    # "Liked genres: Crime, Thriller, Action. Disliked genres: Children's, Comedy."
    assert vllm_proposer.prompt_genres(bare.user) == [
        ["Crime"]] * 3 + [["Thriller"]] * 2 + [["Action"], ["Children's"], ["Children's"],
                                              ["Comedy"]]


def test_feed_stores_generations_in_the_routed_pools_and_they_persist(tokenizer, tmp_path):
    path = str(tmp_path / "pools")
    key = vllm_proposer.register_store(None, path, {"genre_pools": 1})
    prompt = _ids(tokenizer, prompts.cascade_prompt(
        [Activity("Casino (1995) [Crime|Drama]", "rate", 5.0)], context=None,
        context_kind=prompts.CONTEXT_NONE))
    answer = tokenizer(" crime dramas with strong casts.", add_special_tokens=False).input_ids
    assert vllm_proposer.feed(key, prompt, answer, tokenizer) == ["genre:Crime"]
    store = vllm_proposer.store_for(key)
    draft = store.draft(prompt[-4:] + answer[:3], ["genre:Crime"], 4)
    assert draft.tokens == answer[3:7] and draft.pool == "genre:Crime"
    store.close()
    reopened = PoolStore(path)
    assert reopened.stats()["genre:Crime"]["sequences"] == 1
    assert reopened.draft(prompt[-4:] + answer[:3], ["genre:Crime"], 4).tokens == answer[3:7]
    reopened.close()


def test_with_no_stored_router_the_clusters_are_fitted_on_the_first_partitions(tokenizer,
                                                                             tmp_path):
    path = str(tmp_path / "pools")
    store = PoolStore(path)
    pr = vllm_proposer.PromptRouter(tokenizer, store, genre_pools=1, clusters=2, fit_after=4)
    crime = [Activity("Heat (1995) [Action|Crime|Thriller]", "rate", 5.0),
             Activity("Se7en (1995) [Crime|Thriller]", "rate", 4.0)]
    family = [Activity("Babe (1995) [Children's|Comedy]", "rate", 4.0),
              Activity("Toy Story (1995) [Animation|Children's|Comedy]", "rate", 5.0)]
    parts = [crime, family, crime[:1], family[1:]]
    ids = [_ids(tokenizer, prompts.cascade_prompt(
        p, context=None, context_kind=prompts.CONTEXT_NONE)) for p in parts]
    assert [pr.pools(i) for i in ids[:3]] == [["genre:Crime"], ["genre:Children's"],
                                             ["genre:Action"]]
    assert store.get_meta(vllm_proposer.ROUTER_META) is None
    fourth = pr.pools(ids[3])          # the fourth partition completes the sample: fitted
    assert fourth[0].startswith("cluster:") and fourth[1:] == ["genre:Animation"]
    assert len(store.get_meta(vllm_proposer.ROUTER_META)["centroids"]) == 2
    assert "Thriller" in store.get_meta(vllm_proposer.VOCAB_META)
    store.close()

    # a restarted worker reads the stored clusters: crime and family partitions part ways
    store = PoolStore(path)
    again = vllm_proposer.PromptRouter(tokenizer, store, genre_pools=1, clusters=2, fit_after=4)
    crime_cluster, family_cluster = (again.pools(i)[0] for i in ids[:2])
    assert {crime_cluster, family_cluster} == {"cluster:0", "cluster:1"}
    assert again.pools(ids[3])[0] == family_cluster == fourth[0]
    store.close()
