"""No n-gram twice inside one answer: what stops a small model's loops.

SmolLM2-135M, decoded greedily, falls into loops ("Dislikes action, action, action, ...").
A repetition penalty would also punish copying from the prompt (titles, genres), which is
what the answer should do and what DARE's pools draft. So only the answer's own tokens count:
when the last n-1 pieces of the answer already occurred earlier in it, the piece that followed
them then is banned now. The prompt is never looked at.

Pieces are tokens as a reader sees them: lowercased, without their spaces, and pure-space
tokens skipped. Blocking raw token ids was not enough: the model kept its loops going through
"Crime" / " crime" / "  crime", which are different tokens (7% of the evaluation's answers
still held a word 3-gram three times).

`TokenForms` maps a tokenizer's ids to those forms; `banned_next()` is the rule; `NgramBlock`
applies it in the transformers backend and `VLLMNgramBlock` in a vLLM engine (a v1 logits
processor, on per request by `SamplingParams.extra_args[EXTRA_ARG]`). A banned token is
pushed down by a large finite amount rather than to -inf: where a grammar (the labelled lines)
allows only that token, it is still chosen.
"""
from __future__ import annotations

import functools
from typing import Sequence

EXTRA_ARG = "liber_no_repeat_ngram"
PENALTY = 1e4


class TokenForms:
    """Token id -> form id (the same for tokens a reader cannot tell apart; -1 for pure-space
    tokens), and form id -> every token id of that form."""

    def __init__(self, texts: Sequence[str]):
        index: dict[str, int] = {}
        self.form: list[int] = []
        self.tokens: list[list[int]] = []
        for token, text in enumerate(texts):
            key = text.strip().lower()
            if not key:
                self.form.append(-1)
                continue
            if key not in index:
                index[key] = len(self.tokens)
                self.tokens.append([])
            self.form.append(index[key])
            self.tokens[index[key]].append(token)

    @classmethod
    def identity(cls, vocab_size: int) -> "TokenForms":
        """Every token its own form (no tokenizer at hand; tests)."""
        out = cls.__new__(cls)
        out.form = list(range(vocab_size))
        out.tokens = [[i] for i in range(vocab_size)]
        return out

    def of(self, tokens: Sequence[int]) -> list[int]:
        return [self.form[t] for t in tokens if t < len(self.form) and self.form[t] >= 0]


_FORMS: dict[int, TokenForms] = {}


def forms_of(tokenizer) -> TokenForms:
    """The tokenizer's forms, built once per tokenizer object (decoding every id takes ~1 s)."""
    key = id(tokenizer)
    if key not in _FORMS:
        _FORMS[key] = TokenForms(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))
    return _FORMS[key]


def banned_next(tokens: Sequence[int], n: int, forms: TokenForms) -> list[int]:
    """Token ids that would complete an n-gram of forms already present in `tokens` (the
    answer so far)."""
    seq = forms.of(tokens)
    if n < 1 or len(seq) < n - 1:
        return []
    if n == 1:
        return [t for f in set(seq) for t in forms.tokens[f]]
    tail = seq[len(seq) - n + 1:]
    out = set()
    for start in range(len(seq) - n + 1):
        if seq[start:start + n - 1] == tail:
            out.add(seq[start + n - 1])
    return [t for f in out for t in forms.tokens[f]]


class NgramBlock:
    """transformers logits processor over a left-padded batch whose answers start at
    `prompt_len` (the width of the padded prompts)."""

    def __init__(self, n: int, prompt_len: int, forms: TokenForms):
        self.n = n
        self.prompt_len = prompt_len
        self.forms = forms

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len < self.n - 1:
            return scores
        answers = input_ids[:, self.prompt_len:].tolist()
        for row, tokens in enumerate(answers):
            banned = [t for t in banned_next(tokens, self.n, self.forms) if t < scores.shape[1]]
            if banned:
                scores[row, banned] -= PENALTY
        return scores


@functools.cache
def vllm_processor_class():
    """The vLLM logits processor class (imported only where vLLM is installed)."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class VLLMNgramBlock(LogitsProcessor):
        """Per request: n from `extra_args[EXTRA_ARG]`, the live list of its output tokens."""

        def __init__(self, vllm_config, device, is_pin_memory):
            from transformers import AutoTokenizer
            config = vllm_config.model_config
            self.forms = forms_of(AutoTokenizer.from_pretrained(config.tokenizer))
            self.rows: dict[int, tuple[int, list[int]]] = {}

        @classmethod
        def validate_params(cls, params):
            n = (params.extra_args or {}).get(EXTRA_ARG)
            if n is not None and (not isinstance(n, int) or n < 1):
                raise ValueError(f"{EXTRA_ARG} must be a positive integer, not {n!r}")

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            def state(params, _prompt, output):
                n = (params.extra_args or {}).get(EXTRA_ARG)
                return (n, output) if n else None
            process_dict_updates(self.rows, batch_update, state)

        def apply(self, logits):
            for row, (n, output) in self.rows.items():
                banned = [t for t in banned_next(output, n, self.forms) if t < logits.shape[1]]
                if banned:
                    logits[row, banned] -= PENALTY
            return logits

    return VLLMNgramBlock
