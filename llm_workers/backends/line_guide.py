"""`LineGuide`: a logits processor that keeps each row of a batch to its labelled lines.

The answer starts inside the first field (its label is in the prompt). A field must hold a
visible token before it may end; a line break ends it, and the next label's tokens are then
forced; a field that reaches its share of `max_new_tokens` is ended for the model; the
end-of-sequence token comes only after the last field and is forced after it. Tokens that
mix a line break with text are banned (they would glue text to a label).

Every row's state (field, visible tokens in it, forced tokens still queued, done) lives in
tensors and one step updates all rows at once: no Python loop over the batch, and no read of a
GPU tensor back to the host.
"""
from __future__ import annotations

from typing import Sequence

from llm_workers.prompts import ChatPrompt


class LineGuide:
    """Args:
        tokenizer: the model's tokenizer (labels are encoded with it).
        prompts: one `ChatPrompt` per batch row; a row without `structure` is left alone.
        max_new_tokens: the call's budget, shared out over the fields by `line_weights`.
        eos_id: the end-of-sequence token forced after the last field.
        prompt_len: the (padded) prompt length; the first call sees no generated token.
        vocab_size: the width of the model's logits.
    """

    def __init__(self, tokenizer, prompts: Sequence[ChatPrompt], max_new_tokens: int,
                 eos_id: int, prompt_len: int, vocab_size: int):
        import torch
        self.torch = torch
        self.eos_id = eos_id
        self.prompt_len = prompt_len
        newline_ids, dirty_ids, blank_ids, digit_ids, quote_ids = _newline_tables(tokenizer)
        self.newline = tokenizer.encode("\n", add_special_tokens=False)[0]
        # membership of any id the model may emit (the tokenizer may count more ids than logits)
        self.table_size = max(vocab_size, len(tokenizer), eos_id + 1)
        self.is_newline = _member(torch, newline_ids, self.table_size)
        self.is_blank = _member(torch, blank_ids, self.table_size)
        self.ban_dirty = torch.zeros(vocab_size, dtype=torch.bool)
        self.ban_dirty[[i for i in dirty_ids if i < vocab_size]] = True
        self.ban_break = self.ban_dirty.clone()
        self.ban_break[[i for i in newline_ids if i < vocab_size]] = True
        self.ban_break[eos_id] = True
        self.ban_digits = torch.zeros(vocab_size, dtype=torch.bool)
        self.ban_digits[[i for i in digit_ids if i < vocab_size]] = True
        self.ban_quotes = torch.zeros(vocab_size, dtype=torch.bool)
        self.ban_quotes[[i for i in quote_ids if i < vocab_size]] = True
        forced_rows, caps_rows = [], []
        for prompt in prompts:
            labels = prompt.structure
            forced = [tokenizer.encode(prompt.line_head(i), add_special_tokens=False)
                      for i in range(1, len(labels))]
            budget = max_new_tokens - sum(len(f) + 1 for f in forced) - 1
            weights = prompt.line_weights()
            forced_rows.append(forced)
            caps_rows.append([max(2, int(budget * w / sum(weights))) for w in weights])
        n = self.n_rows = len(prompts)
        width = max([len(c) for c in caps_rows] + [1])
        heads = max([len(f) for row in forced_rows for f in row] + [1])
        self.n_caps = torch.tensor([len(c) for c in caps_rows], dtype=torch.long)
        self.caps = torch.zeros(n, width, dtype=torch.long)
        self.forced = torch.zeros(n, width, heads, dtype=torch.long)  # field -> next label
        self.forced_len = torch.zeros(n, width, dtype=torch.long)
        for r, (caps, forced) in enumerate(zip(caps_rows, forced_rows)):
            self.caps[r, : len(caps)] = torch.tensor(caps, dtype=torch.long)
            for f, ids in enumerate(forced):
                self.forced[r, f, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                self.forced_len[r, f] = len(ids)
        self.no_digits = torch.tensor([p.no_digits for p in prompts], dtype=torch.bool)
        self.no_quotes = torch.tensor([p.no_quotes for p in prompts], dtype=torch.bool)
        self.field = torch.zeros(n, dtype=torch.long)
        self.count = torch.zeros(n, dtype=torch.long)    # visible tokens in the current field
        self.queued = torch.zeros(n, dtype=torch.long)   # forced label tokens still to come
        self.done = torch.tensor([not p.structure for p in prompts], dtype=torch.bool)

    def _to(self, device) -> None:
        """Built on the CPU; a GPU model's scores bring everything to their device once."""
        for name in ("is_newline", "is_blank", "ban_dirty", "ban_break", "ban_digits", "n_caps",
                     "caps", "forced", "forced_len", "no_digits", "field", "count", "queued",
                     "ban_quotes", "no_quotes",
                     "done"):
            setattr(self, name, getattr(self, name).to(device))

    def _in(self, table, tokens):
        inside = (tokens >= 0) & (tokens < self.table_size)
        return table[tokens.clamp(0, self.table_size - 1)] & inside

    def _advance(self, tokens) -> None:
        """Each row's state after its last token: a queued label token is consumed, the
        end-of-sequence ends the row, a line break opens the next field (queueing its label)
        or ends the row after the last field, any other visible token counts in its field."""
        torch = self.torch
        live = ~self.done
        popping = live & (self.queued > 0)
        free = live & ~popping
        eos = free & (tokens == self.eos_id)
        newline = free & ~eos & self._in(self.is_newline, tokens)
        visible = free & ~eos & ~newline & ~self._in(self.is_blank, tokens)
        last = self.field + 1 >= self.n_caps
        opens = newline & ~last
        field = self.field.clamp(max=self.forced_len.shape[1] - 1).unsqueeze(1)
        self.queued = torch.where(popping, self.queued - 1, self.queued)
        self.queued = torch.where(opens, self.forced_len.gather(1, field).squeeze(1), self.queued)
        self.count = torch.where(opens, torch.zeros_like(self.count), self.count + visible)
        self.field = self.field + opens
        self.done = self.done | eos | (newline & last)

    def __call__(self, input_ids, scores):
        torch = self.torch
        if self.ban_dirty.device != scores.device:
            self._to(scores.device)
        rows = scores[: self.n_rows]              # a view: the fills below change `scores`
        if input_ids.shape[1] - self.prompt_len > 0:
            self._advance(input_ids[: self.n_rows, -1])
        active = self.n_caps > 0
        last = self.field + 1 >= self.n_caps
        field = self.field.clamp(max=self.caps.shape[1] - 1).unsqueeze(1)
        cap = self.caps.gather(1, field).squeeze(1)
        # the queued label token: forced[field - 1][len - queued] (a queue follows a line break)
        label = (self.field - 1).clamp(min=0).unsqueeze(1)
        at = (self.forced_len.gather(1, label).squeeze(1) - self.queued).clamp(min=0)
        head = self.forced.gather(1, label.unsqueeze(2).expand(-1, 1, self.forced.shape[2]))
        head = head.squeeze(1).gather(1, at.clamp(max=self.forced.shape[2] - 1).unsqueeze(1))
        end = torch.where(last, self.eos_id, self.newline)
        force = torch.where(self.done, self.eos_id, torch.where(
            self.queued > 0, head.squeeze(1), torch.where(cap <= self.count, end, -1)))
        forcing = active & (force >= 0)
        free = active & ~forcing
        index = force.clamp(min=0).unsqueeze(1)
        kept = torch.nan_to_num(rows.gather(1, index), neginf=0.0)
        width = rows.shape[1]
        rows.masked_fill_(forcing.unsqueeze(1), -torch.inf)
        first = (free & (self.count == 0)).unsqueeze(1)
        later = free & (self.count > 0)
        rows.masked_fill_(first & self.ban_break[:width], -torch.inf)
        rows.masked_fill_(later.unsqueeze(1) & self.ban_dirty[:width], -torch.inf)
        rows[:, self.eos_id].masked_fill_(later & ~last, -torch.inf)
        rows.masked_fill_((free & self.no_digits).unsqueeze(1) & self.ban_digits[:width],
                          -torch.inf)
        rows.masked_fill_((free & self.no_quotes).unsqueeze(1) & self.ban_quotes[:width],
                          -torch.inf)
        # the forced token keeps its score (-inf made 0): rows not forced write back their own
        rows.scatter_(1, index, torch.where(forcing.unsqueeze(1), kept, rows.gather(1, index)))
        return scores


def _member(torch, ids, size: int):
    table = torch.zeros(size, dtype=torch.bool)
    table[[i for i in ids if i < size]] = True
    return table


_TABLES: dict[int, tuple[set, set, set, set]] = {}


def _newline_tables(tokenizer) -> tuple[set, set, set, set, set]:
    """(pure line-break tokens, tokens mixing a line break with text, blank tokens, tokens
    holding a digit, tokens holding a double quote)."""
    key = id(tokenizer)
    if key not in _TABLES:
        ids = list(range(len(tokenizer)))
        texts = tokenizer.batch_decode([[i] for i in ids])
        newline, dirty, blank, digits, quotes = set(), set(), set(), set(), set()
        for i, text in zip(ids, texts):
            if "\n" in text or "\r" in text:
                (newline if not text.strip() else dirty).add(i)
            elif not text.strip():
                blank.add(i)
            if any(c.isdigit() for c in text):
                digits.add(i)
            if '"' in text:
                quotes.add(i)
        _TABLES[key] = (newline, dirty, blank, digits, quotes)
    return _TABLES[key]
