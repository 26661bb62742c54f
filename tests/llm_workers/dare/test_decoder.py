"""DARE decoding on the real small model (SmolLM2-135M-Instruct, float32, CPU): strict mode is
token-identical to plain greedy decoding; relaxed mode accepts only what its rule allows,
checked against the model's own probabilities; metrics and the engine's restart."""
from __future__ import annotations

import os

import pytest
import torch

from core.settings import Settings
from llm_workers import model_store
from llm_workers.dare import uil_prompts
from llm_workers.dare.decoder import DareDecoder
from llm_workers.dare.engine import DareEngine
from llm_workers.dare.metrics import DareStats
from llm_workers.dare.pools import PoolStore

MOVIES = [
    [("Toy Story (1995)", ["Animation", "Children's", "Comedy"], 5),
     ("Aladdin (1992)", ["Animation", "Children's", "Comedy", "Musical"], 4),
     ("Heat (1995)", ["Action", "Crime", "Thriller"], 2)],
    [("Alien (1979)", ["Action", "Horror", "Sci-Fi", "Thriller"], 5),
     ("Blade Runner (1982)", ["Film-Noir", "Sci-Fi"], 5),
     ("Sabrina (1995)", ["Comedy", "Romance"], 3)],
    [("Fargo (1996)", ["Crime", "Drama", "Thriller"], 5),
     ("Casino (1995)", ["Drama", "Thriller"], 4),
     ("Babe (1995)", ["Children's", "Comedy", "Drama"], 1)],
    [("Star Wars (1977)", ["Action", "Adventure", "Fantasy", "Sci-Fi"], 5),
     ("Jumanji (1995)", ["Adventure", "Children's", "Fantasy"], 4)],
]
PREVIOUS = [None, "Likes animated family comedies.", None, "Likes science fiction and thrillers."]


def _home() -> str:
    env = {k: v for k, v in os.environ.items() if k == "LIBER_HOME"}
    return Settings.load(env=env).home


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # the test machine is shared: one thread is steadier
    model, tokenizer = model_store.load(_home())
    prompts = [uil_prompts.prompt_ids(tokenizer, m, p) for m, p in zip(MOVIES, PREVIOUS)]
    yield model, tokenizer, prompts
    torch.set_num_threads(threads)


def test_plain_loop_is_transformers_greedy(lm):
    model, _, prompts = lm
    decoder = DareDecoder(model, None, "plain")
    for prompt in prompts[:2]:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=20, pad_token_id=2)[0, len(prompt):].tolist()
        gen = decoder.generate(prompt, max_new_tokens=20)
        assert gen.tokens == ref
        assert gen.steps == len(gen.tokens) - 1 and gen.drafts == 0


def test_strict_is_token_identical_to_plain_greedy(lm):
    model, _, prompts = lm
    plain = DareDecoder(model, None, "plain")
    store = PoolStore()
    strict = DareDecoder(model, store, "strict", draft_len=8)
    # warm the pools with the first prompt's generation, then decode the others
    warm = strict.generate(prompts[0], ["cluster:0", "genre:Comedy"], 32, feed=True)
    assert warm.tokens == plain.generate(prompts[0], max_new_tokens=32).tokens
    accepted = 0
    for prompt in prompts[1:]:
        ref = plain.generate(prompt, max_new_tokens=32)
        gen = strict.generate(prompt, ["cluster:0", "genre:Comedy"], 32, feed=True)
        assert gen.tokens == ref.tokens
        assert gen.steps + 1 + gen.accepted_tokens >= len(gen.tokens)
        accepted += gen.accepted_tokens
    assert accepted > 0            # drafts were really used, so the identity is not vacuous
    assert len(store.pool("cluster:0")) == 4


def _probabilities(model, prompt, tokens):
    """The model's next-token distributions at every generated position (one full pass)."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0]
    return torch.softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)].float(), dim=-1)


def _variant(model, prompt, n, floor=0.15):
    """A continuation that sometimes takes the model's second choice (p > floor): the kind of
    near-greedy text relaxed verification is meant to accept from a pool."""
    from transformers import DynamicCache
    out, swaps, last_swap = [], 0, -10
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for i in range(n):
            logits = model(ids, past_key_values=cache, use_cache=True).logits[0, -1]
            top = torch.softmax(logits.float(), -1).topk(2)
            if i >= 2 and i - last_swap >= 4 and float(top.values[1]) > floor:
                tok, swaps, last_swap = int(top.indices[1]), swaps + 1, i
            else:
                tok = int(top.indices[0])
            out.append(tok)
            ids = torch.tensor([[tok]])
    return out, swaps


def test_relaxed_accepts_only_top_k_tokens_above_the_floor(lm):
    model, _, prompts = lm
    prompt = prompts[2]
    variant, swaps = _variant(model, prompt, 28)
    assert swaps >= 2
    store = PoolStore()
    store.add(["v"], prompt[-8:] + variant)
    relaxed = DareDecoder(model, store, "relaxed", draft_len=10, top_k=2, min_prob=0.1,
                          context_pool=False)
    gen = relaxed.generate(prompt, ["v"], 28)
    probs = _probabilities(model, prompt, gen.tokens)
    tol = 1e-4
    non_argmax = 0
    for i, (tok, drafted) in enumerate(zip(gen.tokens, gen.drafted)):
        p = probs[i]
        if drafted:
            kth = float(p.topk(2).values[-1])
            assert float(p[tok]) >= kth - tol, f"token {i} is not in the top 2"
            assert float(p[tok]) > 0.1 - tol, f"token {i} has p={float(p[tok]):.4f} <= 0.1"
            non_argmax += int(float(p[tok]) < float(p.max()) - tol)
        else:
            assert float(p[tok]) >= float(p.max()) - tol, f"model token {i} is not the argmax"
    assert non_argmax >= 1          # relaxed really accepted second choices from the pool
    assert gen.accepted_tokens >= len(gen.tokens) // 2
    # strict on the same pool rejects those and stays greedy
    strict = DareDecoder(model, store, "strict", draft_len=10, context_pool=False)
    greedy = DareDecoder(model, None, "plain").generate(prompt, max_new_tokens=28).tokens
    assert strict.generate(prompt, ["v"], 28).tokens == greedy != gen.tokens


def test_relaxed_floor_and_k_are_respected_when_tightened(lm):
    model, _, prompts = lm
    prompt = prompts[2]
    variant, _ = _variant(model, prompt, 20)
    store = PoolStore()
    store.add(["v"], prompt[-8:] + variant)
    plain = DareDecoder(model, None, "plain").generate(prompt, max_new_tokens=20).tokens
    # k=1 means "the argmax only": relaxed degenerates to strict
    k1 = DareDecoder(model, store, "relaxed", top_k=1, min_prob=0.0, context_pool=False)
    assert k1.generate(prompt, ["v"], 20).tokens == plain


def test_metrics_count_drafts_per_pool(lm):
    from prometheus_client import REGISTRY
    model, _, prompts = lm
    stats = DareStats()
    decoder = DareDecoder(model, PoolStore(), "relaxed", stats=stats, context_pool=True)
    labels = {"pool": "genre:Sci-Fi", "mode": "relaxed"}
    g1 = decoder.generate(prompts[3], ["genre:Sci-Fi"], 16, feed=True)
    before = REGISTRY.get_sample_value("liber_dare_drafts_total", labels) or 0.0
    g2 = decoder.generate(prompts[3], ["genre:Sci-Fi"], 16)
    assert REGISTRY.get_sample_value("liber_dare_drafts_total", labels) > before
    assert REGISTRY.get_sample_value("liber_dare_accepted_tokens_total", labels) > 0
    assert REGISTRY.get_sample_value("liber_dare_mean_accepted_length", labels) > 0
    snap = stats.snapshot()["relaxed"]
    pools = {p: row for p, row in snap.items() if p != "*"}
    assert "genre:Sci-Fi" in pools
    assert sum(r["drafts"] for r in pools.values()) == g1.drafts + g2.drafts
    assert sum(r["accepted_tokens"] for r in pools.values()) == g1.accepted_tokens + g2.accepted_tokens
    assert snap["*"]["generated_tokens"] == len(g1.tokens) + len(g2.tokens) - 2  # prefill tokens apart


def test_engine_reopens_its_pools_warm(lm, tmp_path):
    model, _, prompts = lm
    env = {k: v for k, v in os.environ.items() if k == "LIBER_HOME"}
    settings = Settings.load(env=env, state_dir=str(tmp_path / "state"), dare_mode="strict",
                             dare_clusters=2)
    engine = DareEngine.open(settings, model)
    engine.fit_router([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], k=2)
    first = engine.generate(prompts[1], [1.0, 0.0], [["Sci-Fi"], ["Sci-Fi", "Thriller"]], 24)
    engine.close()
    again = DareEngine.open(settings, model)
    assert again.router is not None and again.router.centroids == engine.router.centroids
    pools = again.pools_for([1.0, 0.0], [["Sci-Fi"], ["Sci-Fi", "Thriller"]])
    assert all(len(again.store.pool(p)) == 1 for p in pools)
    second = again.generate(prompts[1], [1.0, 0.0], [["Sci-Fi"], ["Sci-Fi", "Thriller"]], 24)
    assert second.tokens == first.tokens
    assert second.accepted_tokens >= len(second.tokens) - 4   # drafted from the reloaded pool
    again.close()


def test_batch_rows_are_each_their_greedy_output(lm):
    """Rows of different lengths stepped together (left padding, per-row drafts and holes in
    the cache, a row that ends early and leaves the batch): strict and plain give each row's
    one-request greedy tokens."""
    model, tokenizer, prompts = lm
    question = [{"role": "user", "content": "What is the capital of France? One word."}]
    short = tokenizer(tokenizer.apply_chat_template(question, add_generation_prompt=True,
                                                    tokenize=False),
                      add_special_tokens=False)["input_ids"]
    batch = [prompts[1], short, prompts[2], prompts[3]]
    plain = DareDecoder(model, None, "plain")
    ref = [plain.generate(p, max_new_tokens=24).tokens for p in batch]
    assert len(ref[1]) < 24 and ref[1][-1] in plain.eos          # the short row ends early
    assert [g.tokens for g in plain.generate_batch(batch, max_new_tokens=24)] == ref
    store = PoolStore()
    store.add(["p"], prompts[0][-8:] + ref[0] + ref[2])
    strict = DareDecoder(model, store, "strict", draft_len=8)
    gens = strict.generate_batch(batch, [["p"]] * 4, 24, feed=True)
    assert [g.tokens for g in gens] == ref
    assert gens[0].accepted_tokens > 0 and gens[2].accepted_tokens > 0
    assert len(store.pool("p")) == 5                             # each row fed once
