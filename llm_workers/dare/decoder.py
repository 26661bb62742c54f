"""DARE's decoding loop for a transformers causal LM: draft from the pools, verify in one pass.

Each step feeds the last accepted token plus the draft (up to `draft_len` tokens) through the
model with the KV cache of everything before; the logits at those positions verify the draft:

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

Batches (`generate_batch`): several requests share each forward pass; rows keep their own
drafts, acceptance and positions, and a row's rejected cache columns are masked rather than
cropped when another row still needs those columns (see the method). `generate` is a batch of 1.

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
class DraftedGeneration:
    """One answer of the DARE decoder, with how much of it came from accepted drafts."""
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
        self._pad = min(self.eos) if self.eos else 0  # any id: padding is masked

    # --- the loop -----------------------------------------------------------------------
    def generate(self, prompt: Sequence[int], pools: Sequence[str] = (), max_new_tokens: int = 128,
                 feed: bool = False, logits_processor: Callable | None = None,
                 should_stop: Callable[[], bool] | None = None) -> DraftedGeneration:
        """Greedy-family decoding of one prompt; `feed` adds the result to `pools` after.
        `should_stop` is asked before every step; when it says yes the generation ends there,
        unfinished (a time limit, a closing backend)."""
        return self.generate_batch([prompt], [pools], max_new_tokens, feed,
                                   [logits_processor], should_stop)[0]

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[Sequence[int]],
                       pools: Sequence[Sequence[str]] | None = None, max_new_tokens: int = 128,
                       feed: bool = False, logits_processors: Sequence[Callable | None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> list[DraftedGeneration]:
        """Several prompts stepped together (one forward pass per step for all rows).

        Prompts are left-padded. Each step every unfinished row feeds its last token and its
        own draft, right-padded to the longest draft of the step; per-row position ids count
        only the row's real tokens. After verification the cache keeps, for all rows, as many
        new columns as the row that accepted most needs; a row's rejected and padding columns
        stay behind as masked holes (attention mask 0). Finished rows leave the batch (the
        cache drops their rows). With one prompt there are no holes and no masks: the cache
        is cropped exactly, as in the one-request loop this replaces."""
        t0, c0 = time.perf_counter(), time.process_time()
        model, mode, dev = self.model, self.mode, self.device
        b = len(prompts)
        if b == 0:
            return []
        pools = [list(p) for p in pools] if pools is not None else [[] for _ in range(b)]
        procs = list(logits_processors) if logits_processors is not None else [None] * b
        if len(pools) != b or len(procs) != b:
            raise ValueError("need one pool list and one logits processor (or None) per prompt")
        drafting = mode != "plain" and self.draft_len > 0
        rows = [_Row(self, [int(t) for t in p], names, proc, max_new_tokens, drafting)
                for p, names, proc in zip(prompts, pools, procs)]
        width = max(len(r.prompt) for r in rows)
        batched = b > 1
        cache = _new_cache(model)
        ids = torch.full((b, width), self._pad, dtype=torch.long, device=dev)
        mask = torch.zeros((b, width), dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        if batched:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = _prefill(model, ids, cache, mask, positions)
        else:
            out = _prefill(model, ids, cache)
        for i, r in enumerate(rows):
            r.start(out.logits[i, -1:])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        for r in rows:
            r.gen.prefill_s = prefill_s

        live = [r for r in rows if not r.done]
        if live and len(live) < b and batched:
            index = torch.tensor([i for i, r in enumerate(rows) if not r.done], device=dev)
            cache.batch_select_indices(index)
            mask = mask[index]
        while live:
            if should_stop is not None and should_stop():
                for r in live:
                    r.gen.stopped = True
                break
            drafts = [r.propose() for r in live]
            span = 1 + max(len(d) for d, _ in drafts)
            step = torch.full((len(live), span), self._pad, dtype=torch.long, device=dev)
            for i, (r, (d, _)) in enumerate(zip(live, drafts)):
                step[i, :1 + len(d)] = torch.tensor([r.last] + d)
            if batched:
                new_cols = torch.zeros((len(live), span), dtype=torch.long, device=dev)
                for i, (d, _) in enumerate(drafts):
                    new_cols[i, :1 + len(d)] = 1
                mask = torch.cat([mask, new_cols], dim=1)
                positions = torch.tensor([[r.valid + j for j in range(span)] for r in live],
                                         device=dev)
                logits = model(input_ids=step, attention_mask=mask, position_ids=positions,
                               past_key_values=cache, use_cache=True).logits
            else:
                logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits
            keep = 1
            for i, (r, (d, pool)) in enumerate(zip(live, drafts)):
                n_acc = r.accept(logits[i, :1 + len(d)], d, pool)
                if batched:
                    mask[i, mask.shape[1] - span + 1 + n_acc:] = 0   # rejected and padding
                keep = max(keep, 1 + n_acc)
            if span > keep:                                  # columns no row needs any more
                cache.crop(-(span - keep))
                if batched:
                    mask = mask[:, :mask.shape[1] - (span - keep)]
            still = [i for i, r in enumerate(live) if not r.done]
            if len(still) < len(live):
                if still and batched:
                    index = torch.tensor(still, device=dev)
                    cache.batch_select_indices(index)
                    mask = mask[index]
                live = [live[i] for i in still]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        total_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        gens = []
        for r in rows:
            gen = r.gen
            del gen.tokens[max_new_tokens:], gen.drafted[max_new_tokens:]
            gen.total_s, gen.cpu_s = total_s, cpu_s
            if feed and not gen.stopped:
                self.feed(r.prompt, gen.tokens, r.pools)
            gens.append(gen)
        return gens

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


class _Row:
    """One request inside `generate_batch`: its context, drafting and acceptance."""

    def __init__(self, decoder: DareDecoder, prompt: list[int], pools: list[str],
                 processor: Callable | None, max_new_tokens: int, drafting: bool):
        self.d = decoder
        self.prompt, self.pools, self.processor = prompt, pools, processor
        self.max_new = max_new_tokens
        self.drafting = drafting
        self.valid = len(prompt)           # the row's real tokens in the cache
        self.seq = None                    # prompt + generated (+ draft), for the processor
        if processor is not None:
            room = len(prompt) + max_new_tokens + (decoder.draft_len if drafting else 0) + 1
            self.seq = torch.empty((1, room), dtype=torch.long, device=decoder.device)
            self.seq[0, :len(prompt)] = torch.tensor(prompt)
        self.gen: DraftedGeneration | None = None
        self.own = self.own_id = self.extra = None

    def start(self, logits: torch.Tensor) -> None:
        """The prefill's last-position logits give the first token."""
        scores = logits
        if self.processor is not None:
            scores = self.processor(self.seq[:, :len(self.prompt)],
                                    logits.to(torch.float32, copy=True))
        self.last = int(scores[0].argmax())
        self.gen = DraftedGeneration([self.last], [False], pools=list(self.pools))
        self.context = self.prompt + [self.last]
        if self.seq is not None:
            self.seq[0, len(self.prompt)] = self.last
        if self.drafting and self.d.context_pool:
            config = self.d._drafter.config
            self.own = SuffixIndex(max_ngram=config.max_ngram, min_ngram=config.min_ngram,
                                   max_tokens=1 << 30)
            self.own_id, _ = self.own.add(self.context, growing=True)
            self.extra = {CONTEXT_POOL: self.own}

    @property
    def done(self) -> bool:
        return len(self.gen.tokens) >= self.max_new or self.last in self.d.eos

    def propose(self) -> tuple[list[int], str]:
        budget = self.max_new - len(self.gen.tokens)       # the step adds accepted + 1 tokens
        if not self.drafting or budget <= 1:
            return [], ""
        d = self.d._drafter.draft(self.context, self.pools, min(self.d.draft_len, budget - 1),
                                  self.extra)
        return d.tokens, d.pool

    def accept(self, logits: torch.Tensor, draft: list[int], pool: str) -> int:
        """Verify `draft` on its logits ([1 + len(draft), V]); returns the accepted count."""
        dec, gen = self.d, self.gen
        if self.processor is None:
            n_acc, chosen = dec._verify(logits, draft)
        else:
            n = len(self.context)
            if draft:
                self.seq[0, n:n + len(draft)] = torch.tensor(draft)
            n_acc, chosen = dec._verify_processed(logits, draft, self.seq, n, self.processor)
        self.valid += 1 + n_acc                 # `last` and the accepted draft are cached now
        new = draft[:n_acc] + [chosen]
        flags = [True] * n_acc + [False]
        for i, tok in enumerate(new):           # stop at an end token
            if tok in dec.eos:
                new, flags = new[:i + 1], flags[:i + 1]
                break
        gen.steps += 1
        if draft:
            gen.drafts += 1
            gen.draft_tokens += len(draft)
            gen.accepted_tokens += min(n_acc, len(new))
            dec.stats.draft(pool, dec.mode, len(draft), min(n_acc, len(new)))
        dec.stats.step(dec.mode, len(new))
        if self.seq is not None:
            n = len(self.context)
            room = self.seq.shape[1] - n
            self.seq[0, n:n + min(room, len(new))] = torch.tensor(new[:room])
        gen.tokens.extend(new)
        gen.drafted.extend(flags)
        self.context.extend(new)
        if self.own is not None:
            self.own.extend(self.own_id, new)
        self.last = new[-1]
        return n_acc


def _new_cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:                   # transformers < 4.56 takes no config
        return DynamicCache()


def _prefill(model, ids, cache, mask=None, positions=None):
    """The prompts' forward pass, computing the logits of the last position only."""
    kwargs = {} if mask is None else {"attention_mask": mask, "position_ids": positions}
    try:
        return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                     **kwargs)
    except TypeError:                   # older transformers: all positions' logits
        return model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)


def _eos_ids(model) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}
