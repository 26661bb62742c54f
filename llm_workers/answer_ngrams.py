"""No n-gram twice inside one answer: what stops a small model's loops.

SmolLM2-135M, decoded greedily, falls into loops ("Dislikes action, action, action, ...").
A repetition penalty would also punish copying from the prompt (titles, genres), which is
what the answer should do and what DARE's pools draft. So only the answer's own tokens count:
when the last n-1 generated tokens already occurred earlier in the answer, the token that
followed them then is banned now. The prompt is never looked at.

`banned_next()` is the rule; `NgramBlock` applies it in the transformers backend and
`VLLMNgramBlock` in a vLLM engine (a v1 logits processor, turned on per request by
`SamplingParams.extra_args[EXTRA_ARG]`). A banned token is pushed down by a large finite
amount rather than to -inf: where a grammar (the labelled lines) allows only that token, it is
still chosen.
"""
from __future__ import annotations

import functools
from typing import Sequence

EXTRA_ARG = "liber_no_repeat_ngram"
PENALTY = 1e4


def banned_next(tokens: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `tokens` (the answer so far)."""
    if n < 1 or len(tokens) < n - 1:
        return []
    if n == 1:
        return list(set(tokens))
    tail = list(tokens[len(tokens) - n + 1:])
    out = set()
    for start in range(len(tokens) - n + 1):
        if list(tokens[start:start + n - 1]) == tail:
            out.add(tokens[start + n - 1])
    return list(out)


class NgramBlock:
    """transformers logits processor over a left-padded batch whose answers start at
    `prompt_len` (the width of the padded prompts)."""

    def __init__(self, n: int, prompt_len: int):
        self.n = n
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len < self.n - 1:
            return scores
        answers = input_ids[:, self.prompt_len:].tolist()
        for row, tokens in enumerate(answers):
            banned = banned_next(tokens, self.n)
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
                banned = banned_next(output, n)
                if banned:
                    logits[row, banned] -= PENALTY
            return logits

    return VLLMNgramBlock
