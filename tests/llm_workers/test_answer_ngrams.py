"""The answer's n-gram block: loops inside the answer are cut, copying the prompt is not."""
from __future__ import annotations

import torch

from llm_workers.answer_ngrams import PENALTY, NgramBlock, banned_next


def test_banned_next_finds_every_token_that_would_repeat_an_ngram():
    assert banned_next([5, 6, 7, 5, 6], 3) == [7]          # "5 6" was followed by 7
    assert sorted(banned_next([5, 6, 7, 5, 6, 8, 5, 6], 3)) == [7, 8]
    assert banned_next([5, 6, 7], 3) == []                  # "6 7" never seen before
    assert banned_next([5], 3) == [] and banned_next([], 2) == []
    assert sorted(banned_next([1, 2, 1], 2)) == [2]
    assert banned_next([1, 2], 0) == []


def test_block_looks_only_at_the_answer_not_the_prompt():
    # prompt (width 4) holds "5 6 7"; the answer "5 6" may copy it, and may not repeat itself
    prompt = [5, 6, 7, 9]
    block = NgramBlock(3, prompt_len=len(prompt))
    scores = torch.zeros(1, 10)
    out = block(torch.tensor([prompt + [5, 6]]), scores.clone())
    assert torch.all(out == 0)                               # copying the prompt stays allowed
    out = block(torch.tensor([prompt + [5, 6, 7, 5, 6]]), scores.clone())
    assert out[0, 7] == -PENALTY and torch.count_nonzero(out) == 1


def test_block_per_row_of_a_left_padded_batch():
    block = NgramBlock(2, prompt_len=2)
    ids = torch.tensor([[0, 1, 3, 4, 3], [1, 1, 3, 3, 2]])
    out = block(ids, torch.zeros(2, 6))
    assert out[0, 4] == -PENALTY and torch.count_nonzero(out[0]) == 1
    assert torch.count_nonzero(out[1]) == 0                  # "3 3 2": no bigram seen twice yet
