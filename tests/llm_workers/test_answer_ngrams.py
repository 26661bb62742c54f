"""The answer's n-gram block: loops inside the answer are cut, copying the prompt is not."""
from __future__ import annotations

import torch

from llm_workers.answer_ngrams import PENALTY, NgramBlock, TokenForms, banned_next

IDS = TokenForms.identity(10)


def test_banned_next_finds_every_token_that_would_repeat_an_ngram():
    assert banned_next([5, 6, 7, 5, 6], 3, IDS) == [7]          # "5 6" was followed by 7
    assert sorted(banned_next([5, 6, 7, 5, 6, 8, 5, 6], 3, IDS)) == [7, 8]
    assert banned_next([5, 6, 7], 3, IDS) == []                  # "6 7" never seen before
    assert banned_next([5], 3, IDS) == [] and banned_next([], 2, IDS) == []
    assert sorted(banned_next([1, 2, 1], 2, IDS)) == [2]
    assert banned_next([1, 2], 0, IDS) == []


def test_tokens_a_reader_cannot_tell_apart_count_as_one():
    # 0 "Crime", 1 " crime", 2 ",", 3 "  ", 4 " action", 5 "Action", 6 " drama"
    forms = TokenForms(["Crime", " crime", ",", "  ", " action", "Action", " drama"])
    assert forms.of([0, 3, 1, 2]) == [0, 0, 1]                   # spaces skipped, case folded
    # "Crime, action," then " crime ,": the next " action" or "Action" would repeat a 3-gram
    assert sorted(banned_next([0, 2, 4, 2, 1, 3, 2], 3, forms)) == [4, 5]
    assert banned_next([0, 2, 6], 3, forms) == []


def test_block_looks_only_at_the_answer_not_the_prompt():
    # prompt (width 4) holds "5 6 7"; the answer "5 6" may copy it, and may not repeat itself
    prompt = [5, 6, 7, 9]
    block = NgramBlock(3, prompt_len=len(prompt), forms=IDS)
    scores = torch.zeros(1, 10)
    out = block(torch.tensor([prompt + [5, 6]]), scores.clone())
    assert torch.all(out == 0)                               # copying the prompt stays allowed
    out = block(torch.tensor([prompt + [5, 6, 7, 5, 6]]), scores.clone())
    assert out[0, 7] == -PENALTY and torch.count_nonzero(out) == 1


def test_block_per_row_of_a_left_padded_batch():
    block = NgramBlock(2, prompt_len=2, forms=IDS)
    ids = torch.tensor([[0, 1, 3, 4, 3], [1, 1, 3, 3, 2]])
    out = block(ids, torch.zeros(2, 6))
    assert out[0, 4] == -PENALTY and torch.count_nonzero(out[0]) == 1
    assert torch.count_nonzero(out[1]) == 0                  # "3 3 2": no bigram seen twice yet
