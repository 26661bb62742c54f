"""DARE inside the LLM worker's transformers backend (`LIBER_LLM_DARE=1`, see backends/transformers.py).

The backend hands over a call's rendered prompts (token ids), each with its logits processors
(repetition penalty, `LineGuide`); they are decoded together (`DareDecoder.generate_batch`).
Here each request's pools are picked from what the prompt carries, with the same `PromptRouter`
as the vLLM proposer (the items' `"Title" [Genre|...]` lines give `genre:` pools; a fitted
router with its genre vocabulary in the store gives the `cluster:` pool, and with none stored
the router fits itself on the first LIBER_DARE_ROUTER_FIT_AFTER partitions); `DareDecoder`
decodes with the configured verification (`LIBER_DARE_MODE` strict or relaxed) judging each
position on the processed scores; each finished generation is fed back into the pools it read.
The pools live in RocksDB (LIBER_DARE_POOL_DIR, default STATE/dare-pools), so a restarted worker
starts warm.
"""
from __future__ import annotations

import threading
from typing import Callable, Sequence

from llm_workers.dare.decoder import DareDecoder, DraftedGeneration
from llm_workers.dare.engine import check_settings, open_pools
from llm_workers.dare.metrics import DareStats
from llm_workers.dare.pools import PoolStore
from llm_workers.dare.vllm_proposer import PromptRouter


class BackendDare:
    def __init__(self, model, tokenizer, store: PoolStore, *, mode: str = "relaxed",
                 draft_len: int = 15, top_k: int = 2, min_prob: float = 0.1,
                 context_pool: bool = True, genre_pools: int = 2, clusters: int = 0,
                 router_fit_after: int = 0, eos_ids: Sequence[int] = (),
                 stats: DareStats | None = None):
        if mode not in ("strict", "relaxed"):
            raise ValueError(f"DARE in the backend needs mode strict or relaxed, not {mode!r}")
        self.store = store
        self.router = PromptRouter(tokenizer, store, genre_pools, clusters=clusters,
                                   fit_after=router_fit_after)
        self.decoder = DareDecoder(model, store, mode, draft_len=draft_len, top_k=top_k,
                                   min_prob=min_prob, context_pool=context_pool,
                                   eos_token_ids=eos_ids, stats=stats)
        self._lock = threading.Lock()   # routing cache and feeding vs. closing
        self._closed = False

    @classmethod
    def open(cls, settings, model, tokenizer, eos_ids: Sequence[int] = ()) -> "BackendDare":
        check_settings(settings)
        return cls(model, tokenizer, open_pools(settings), mode=settings.dare_mode,
                   draft_len=settings.dare_draft_len, top_k=settings.dare_top_k,
                   min_prob=settings.dare_min_prob, context_pool=bool(settings.dare_context_pool),
                   genre_pools=settings.dare_genre_pools, clusters=settings.dare_clusters,
                   router_fit_after=settings.dare_router_fit_after, eos_ids=eos_ids)

    @property
    def mode(self) -> str:
        return self.decoder.mode

    def pools(self, prompt_ids: Sequence[int]) -> list[str]:
        with self._lock:
            return self.router.pools(prompt_ids)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 logits_processors: Sequence[Callable | None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[DraftedGeneration]:
        """Decode a batch of prompts (token ids) together; every generation that ran to its
        end is fed into its pools."""
        pools = [self.pools(p) for p in prompts]
        gens = self.decoder.generate_batch(prompts, pools, max_new_tokens,
                                           logits_processors=logits_processors,
                                           should_stop=should_stop)
        with self._lock:
            if not self._closed:
                for prompt, names, gen in zip(prompts, pools, gens):
                    if not gen.stopped:
                        self.decoder.feed(prompt, gen.tokens, names)
        return gens

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.store.close()
