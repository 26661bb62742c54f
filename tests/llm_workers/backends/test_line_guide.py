"""`LineGuide` on a toy vocabulary: every row of a batch kept to its own labelled lines."""
from __future__ import annotations

import torch

from llm_workers.backends import LineGuide
from llm_workers.prompts import ChatPrompt

VOCAB = ["<eos>", "\n", " ", "A", "B", ":", "x", "7", "x\ny", '"']
EOS, NL, X, DIGIT, DIRTY, QUOTE = 0, 1, 6, 7, 8, 9


class ToyTokenizer:
    """One token a character (and a token gluing a line break to text)."""

    def __len__(self):
        return len(VOCAB)

    def encode(self, text, add_special_tokens=False):
        return [VOCAB.index(c) for c in text]

    def batch_decode(self, rows):
        return ["".join(VOCAB[i] for i in row) for row in rows]


def _allowed(guide, ids):
    scores = guide(torch.tensor(ids), torch.zeros(len(ids), len(VOCAB)))
    return [set(torch.nonzero(row > -torch.inf).flatten().tolist()) for row in scores]


def test_fields_labels_and_the_end_are_kept_per_row():
    labelled = ChatPrompt("", "u", structure=("A", "B"), no_digits=True)
    plain = ChatPrompt("", "u")
    guide = LineGuide(ToyTokenizer(), [labelled, plain], 40, EOS, prompt_len=1,
                      vocab_size=len(VOCAB))
    everything = set(range(len(VOCAB)))
    ids = [[X], [X]]
    # an empty field: no line break, end or glued token yet; no digit in this answer
    assert _allowed(guide, ids) == [everything - {EOS, NL, DIRTY, DIGIT}, everything]
    steps = [(X, everything - {EOS, DIRTY, DIGIT}),   # text in field 1: it may end, not the answer
             (NL, {VOCAB.index("B")}),                # the next label is forced, token by token
             (VOCAB.index("B"), {VOCAB.index(":")}),
             (VOCAB.index(":"), everything - {EOS, NL, DIRTY, DIGIT}),
             (X, everything - {DIRTY, DIGIT}),        # the last field may end the answer
             (NL, {EOS})]                             # after the last line: the end only
    for token, allowed in steps:
        ids = [row + [token] for row in ids]
        assert _allowed(guide, ids) == [allowed, everything]


def test_a_full_field_is_ended_for_the_model():
    prompt = ChatPrompt("", "u", structure=("A", "B"))
    guide = LineGuide(ToyTokenizer(), [prompt], 8, EOS, prompt_len=1, vocab_size=len(VOCAB))
    cap = int(guide.caps[0, 0])
    ids = [[X]]
    for _ in range(cap):
        _allowed(guide, ids)
        ids = [ids[0] + [X]]
    assert _allowed(guide, ids) == [{NL}]


def test_no_quotes_bans_the_quote_in_that_row_only():
    quiet = ChatPrompt("", "u", structure=("A", "B"), no_quotes=True)
    free = ChatPrompt("", "u", structure=("A", "B"))
    guide = LineGuide(ToyTokenizer(), [quiet, free], 40, EOS, prompt_len=1,
                      vocab_size=len(VOCAB))
    ids = [[X, X], [X, X]]   # one visible token into the first field
    quiet_allowed, free_allowed = _allowed(guide, ids)
    assert QUOTE not in quiet_allowed and X in quiet_allowed and DIGIT in quiet_allowed
    assert QUOTE in free_allowed
