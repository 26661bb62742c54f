"""DARE's decoding loop for a transformers causal LM: draft from the pools, verify in one pass.

One request at a time (batch size 1). Each step feeds the last accepted token plus the draft
(up to `draft_len` tokens) through the model with the KV cache of everything before; the logits
at those positions verify the draft:

  strict  - a draft token is accepted when it equals the model's argmax there: the output is
            the plain greedy output (lossless, up to floating-point ties between argmaxes);
  relaxed - accepted when it lies in the model's top-k there and its probability exceeds
            `min_prob` (DARE's rule; defaults k=2, p=0.1);
  plain   - no drafts: ordinary greedy decoding through the same loop (the baseline).

Drafts come from the request's pools and, with `context_pool`, from the request's own text
(prompt + generated so far, indexed as it grows: REST's datastore plus prompt lookup), through
one `PoolStore.draft` call; the longest suffix match across them wins.

Verification stops at the first rejected token, where the model's own argmax is taken instead
(or, when all were accepted, the model's next token after the draft is added for free). The
cache entries of the rejected draft tokens are cropped, so every step reuses the cache.

`logits_processor` (optional, per request): an HF-style processor `(input_ids [1, L],
scores [1, V]) -> scores` such as a `LogitsProcessorList` (repetition penalty, a format guide).
Verification then judges each position on the processed scores, as `model.generate` would
see them: positions are processed in order, each with the tokens before it (context plus the
draft tokens ahead of it), and none after the first rejection. So a stateful processor sees
exactly the token sequence plain decoding would show it, and `strict` stays identical to
`generate(..., logits_processor=...)` greedy output.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from llm_workers.dare.metrics import DareStats
from llm_workers.dare.pools import PoolStore
from llm_workers.dare.suffix_index import SuffixIndex

MODES = ("plain", "strict", "relaxed")
CONTEXT_POOL = "context"


@dataclass
class Generation:
    tokens: list[int]                 # generated tokens (an end token, if produced, included)
    drafted: list[bool]               # per token: True when it came from an accepted draft
    steps: int = 0                    # forward passes after the prefill
    drafts: int = 0                   # steps that carried a non-empty draft
    draft_tokens: int = 0
    accepted_tokens: int = 0
    prefill_s: float = 0.0
    total_s: float = 0.0              # wall clock
    cpu_s: float = 0.0                # this process's CPU time (robust on a shared CPU)
    pools: list[str] = field(default_factory=list)
    stopped: bool = False             # True when `should_stop` ended it early

    @property
    def mean_accepted_len(self) -> float:
        return self.accepted_tokens / self.drafts if self.drafts else 0.0


class DareDecoder:
    def __init__(self, model, pools: PoolStore | None = None, mode: str = "strict",
                 draft_len: int = 8, top_k: int = 2, min_prob: float = 0.1,
                 context_pool: bool = True, eos_token_ids: Sequence[int] = (),
                 stats: DareStats | None = None, prefix_tokens: int = 8):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if draft_len < 0 or top_k < 1 or not 0 <= min_prob < 1:
            raise ValueError("need draft_len >= 0, top_k >= 1, 0 <= min_prob < 1")
        self.model = model
        self.pools = pools
        self._drafter = pools if pools is not None else PoolStore()  # no pools: own text only
        self.mode = mode
        self.draft_len = draft_len
        self.top_k = top_k
        self.min_prob = min_prob
        self.context_pool = context_pool
        self.eos = set(eos_token_ids) or _eos_ids(model)
        self.stats = stats or DareStats()
        self.prefix_tokens = prefix_tokens  # prompt tokens stored ahead of each generation
        self.device = next(model.parameters()).device

    # --- the loop -----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt: Sequence[int], pools: Sequence[str] = (), max_new_tokens: int = 128,
                 feed: bool = False, logits_processor: Callable | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Generation:
        """Greedy-family decoding of one prompt; `feed` adds the result to `pools` after.
        `should_stop` is asked before every step; when it says yes the generation ends there,
        unfinished (a time limit, a closing backend)."""
        t0, c0 = time.perf_counter(), time.process_time()
        model, mode = self.model, self.mode
        prompt = [int(t) for t in prompt]
        drafting = mode != "plain" and self.draft_len > 0
        cache = _new_cache(model)
        ids = torch.tensor([prompt], device=self.device)
        seq = None      # prompt + generated (+ the draft under verification), for the processor
        if logits_processor is not None:
            room = len(prompt) + max_new_tokens + (self.draft_len if drafting else 0) + 1
            seq = torch.empty((1, room), dtype=torch.long, device=self.device)
            seq[0, :len(prompt)] = ids[0]
        out = _prefill(model, ids, cache)
        scores = out.logits[:, -1]
        if logits_processor is not None:
            scores = logits_processor(seq[:, :len(prompt)], scores.to(torch.float32, copy=True))
        last = int(scores[0].argmax())
        gen = Generation([last], [False], pools=list(pools))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        gen.prefill_s = time.perf_counter() - t0

        context = prompt + [last]
        if seq is not None:
            seq[0, len(prompt)] = last
        extra = None
        if drafting and self.context_pool:
            config = self._drafter.config
            own = SuffixIndex(max_ngram=config.max_ngram, min_ngram=config.min_ngram,
                              max_tokens=1 << 30)
            own_id, _ = own.add(context, growing=True)
            extra = {CONTEXT_POOL: own}
        while len(gen.tokens) < max_new_tokens and last not in self.eos:
            if should_stop is not None and should_stop():
                gen.stopped = True
                break
            budget = max_new_tokens - len(gen.tokens)      # the step adds accepted + 1 tokens
            draft, pool = [], ""
            if drafting and budget > 1:
                d = self._drafter.draft(context, pools, min(self.draft_len, budget - 1), extra)
                draft, pool = d.tokens, d.pool
            step_ids = torch.tensor([[last] + draft], device=self.device)
            logits = model(input_ids=step_ids, past_key_values=cache, use_cache=True).logits[0]
            if logits_processor is None:
                n_acc, chosen = self._verify(logits, draft)
            else:
                n = len(context)
                if draft:
                    seq[0, n:n + len(draft)] = step_ids[0, 1:]
                n_acc, chosen = self._verify_processed(logits, draft, seq, n, logits_processor)
            if len(draft) > n_acc:                          # drop the rejected tokens' entries
                cache.crop(-(len(draft) - n_acc))
            new = draft[:n_acc] + [chosen]
            flags = [True] * n_acc + [False]
            for i, tok in enumerate(new):                   # stop at an end token
                if tok in self.eos:
                    new, flags = new[:i + 1], flags[:i + 1]
                    break
            gen.steps += 1
            if draft:
                gen.drafts += 1
                gen.draft_tokens += len(draft)
                gen.accepted_tokens += min(n_acc, len(new))
                self.stats.draft(pool, mode, len(draft), min(n_acc, len(new)))
            self.stats.step(mode, len(new))
            if seq is not None:
                seq[0, len(context):len(context) + len(new)] = torch.tensor(new)
            gen.tokens.extend(new)
            gen.drafted.extend(flags)
            context.extend(new)
            if extra is not None:
                own.extend(own_id, new)
            last = new[-1]
        del gen.tokens[max_new_tokens:], gen.drafted[max_new_tokens:]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        gen.total_s = time.perf_counter() - t0
        gen.cpu_s = time.process_time() - c0
        if feed and not gen.stopped:
            self.feed(prompt, gen.tokens, pools)
        return gen

    def _verify(self, logits: torch.Tensor, draft: list[int]) -> tuple[int, int]:
        """(accepted draft tokens, the model's token at the first rejection or after the draft)."""
        if not draft:
            return 0, int(logits[-1].argmax())
        n = len(draft)
        target = torch.tensor(draft, device=logits.device)
        if self.mode == "strict":
            preds = logits.argmax(dim=-1)
            ok = preds[:n] == target
        else:
            probs = torch.softmax(logits[:n].float(), dim=-1)
            top = probs.topk(self.top_k, dim=-1).indices
            ok = (top == target[:, None]).any(dim=-1) & (probs.gather(1, target[:, None])[:, 0] > self.min_prob)
            preds = None
        ok = ok.tolist()
        n_acc = ok.index(False) if False in ok else n
        chosen = int(preds[n_acc]) if preds is not None else int(logits[n_acc].argmax())
        return n_acc, chosen

    def _verify_processed(self, logits: torch.Tensor, draft: list[int], seq: torch.Tensor,
                          n: int, processor: Callable) -> tuple[int, int]:
        """`_verify` on processed scores: position i is processed with `seq[:, :n + i]` (the
        context, then the draft tokens before i), in order, stopping at the first rejection
        (see the module doc: a stateful processor must not see rejected tokens)."""
        for i in range(len(draft) + 1):
            scores = processor(seq[:, :n + i], logits[i:i + 1].to(torch.float32, copy=True))[0]
            best = int(scores.argmax())
            if i == len(draft):
                return i, best
            tok = draft[i]
            if self.mode == "strict":
                ok = tok == best
            else:
                probs = torch.softmax(scores, dim=-1)
                ok = float(probs[tok]) > self.min_prob and \
                    tok in probs.topk(self.top_k).indices.tolist()
            if not ok:
                return i, best
            if tok in self.eos:                    # the generation ends with this token
                return i + 1, tok
        raise AssertionError("unreachable")

    def feed(self, prompt: Sequence[int], tokens: Sequence[int], pools: Sequence[str]) -> None:
        """Store a finished generation (after its last few prompt tokens) in its pools."""
        if self.pools is None or not pools:
            return
        head = list(prompt[-self.prefix_tokens:]) if self.prefix_tokens else []
        self.pools.add(pools, head + list(tokens))
        for name in pools:
            self.stats.pool_size(name, self.pools.pool(name).tokens)


def _new_cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:                   # transformers < 4.56 takes no config
        return DynamicCache()


def _prefill(model, ids, cache):
    """The prompt's forward pass, computing the logits of its last position only."""
    try:
        return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    except TypeError:                   # older transformers: all positions' logits
        return model(input_ids=ids, past_key_values=cache, use_cache=True)


def _eos_ids(model) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}
