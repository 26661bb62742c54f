"""The transformers backend with the real SmolLM2-135M-Instruct (small max_new_tokens)."""
from __future__ import annotations

import pytest

from llm_workers import backends, prompts
from llm_workers.prompts import Activity


def test_batched_generation_keeps_the_labelled_lines(backend):
    v2 = {"template": prompts.KAR_V2}     # three lines: the guide's harder case
    short = prompts.cascade_prompt([Activity("Heat (1995) [Action|Crime]", "rate", 5.0)],
                                   context=None, context_kind=prompts.CONTEXT_NONE, **v2)
    long = prompts.cascade_prompt(
        [Activity(f"Movie {i} (1990) [Drama|Romance]", "rate", 1.0 + i % 5) for i in range(12)],
        context="Enjoys romantic dramas.", context_kind=prompts.CONTEXT_PREVIOUS, **v2)
    gens = backend.generate([short, long, "Say hello."], 28, timeout_s=120)
    assert len(gens) == 3
    assert backend.count_tokens(short) == gens[0].tokens_in < gens[1].tokens_in
    assert backend.count_tokens_many([short, long]) == [gens[0].tokens_in, gens[1].tokens_in]
    for g, p in zip(gens[:2], (short, long)):
        assert 0 < g.tokens_out <= 28 and g.seconds > 0
        parsed = prompts.parse(p.prefix + g.text)  # the guide makes every answer parseable
        assert parsed["SUMMARY"].startswith("Likes") and parsed["PROFILE"].startswith("Enjoys")
        assert "SHIFT: Compared with the previous profile," in p.prefix + g.text
    assert gens[2].text.strip() and gens[2].tokens_out <= 28  # a plain string prompt works too
    again = backend.generate([short], 28)[0]
    assert again.text == gens[0].text  # greedy + left padding: same answer alone or in a batch


def test_timeout_raises(backend):
    p = prompts.cascade_prompt([Activity("Heat (1995)", "rate", 5.0)], context=None,
                               context_kind=prompts.CONTEXT_NONE)
    with pytest.raises(backends.LLMTimeout):
        backend.generate([p], 400, timeout_s=0.05)
