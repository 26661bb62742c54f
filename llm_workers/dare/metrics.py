"""Prometheus metrics of DARE decoding, per pool (the pool a draft came from; `none` when no
pool had a match). Mean accepted length = accepted tokens / drafts (`liber_dare_mean_accepted_length`
is kept as a gauge for dashboards; a PromQL rate ratio gives the windowed value).

prometheus-client is optional here so that the benchmark runs on machines with only torch and
transformers: without it the counters are kept in-process only (`snapshot()` still works).
"""
from __future__ import annotations

import threading
from collections import defaultdict

try:
    from prometheus_client import Counter, Gauge
except ImportError:  # pragma: no cover - exercised on bare GPU machines
    Counter = Gauge = None

_NAMES = ("drafts", "draft_tokens", "accepted_tokens", "steps", "generated_tokens")

if Counter is not None:
    DRAFTS = Counter("liber_dare_drafts_total", "Drafts proposed to the verifier", ["pool", "mode"])
    DRAFT_TOKENS = Counter("liber_dare_draft_tokens_total", "Draft tokens proposed", ["pool", "mode"])
    ACCEPTED = Counter("liber_dare_accepted_tokens_total", "Draft tokens accepted by verification",
                       ["pool", "mode"])
    STEPS = Counter("liber_dare_verify_steps_total", "Model forward passes while decoding", ["mode"])
    GENERATED = Counter("liber_dare_generated_tokens_total", "Tokens generated", ["mode"])
    MEAN_ACCEPTED = Gauge("liber_dare_mean_accepted_length",
                          "Accepted tokens per draft since start", ["pool", "mode"])
    POOL_TOKENS = Gauge("liber_dare_pool_tokens", "Tokens stored in a retrieval pool", ["pool"])


class DareStats:
    """Counts of one decoder (per pool and mode); also mirrored to Prometheus when present."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(_NAMES, 0))

    def draft(self, pool: str, mode: str, proposed: int, accepted: int) -> None:
        pool = pool or "none"
        with self._lock:
            c = self._counts[(pool, mode)]
            c["drafts"] += 1
            c["draft_tokens"] += proposed
            c["accepted_tokens"] += accepted
            mean = c["accepted_tokens"] / c["drafts"]
        if Counter is not None:
            DRAFTS.labels(pool, mode).inc()
            DRAFT_TOKENS.labels(pool, mode).inc(proposed)
            ACCEPTED.labels(pool, mode).inc(accepted)
            MEAN_ACCEPTED.labels(pool, mode).set(mean)

    def step(self, mode: str, generated: int) -> None:
        with self._lock:
            c = self._counts[("*", mode)]
            c["steps"] += 1
            c["generated_tokens"] += generated
        if Counter is not None:
            STEPS.labels(mode).inc()
            GENERATED.labels(mode).inc(generated)

    @staticmethod
    def pool_size(pool: str, tokens: int) -> None:
        if Gauge is not None:
            POOL_TOKENS.labels(pool).set(tokens)

    def snapshot(self) -> dict:
        """{mode: {pool: counts with mean_accepted_len}}; pool `*` holds steps and tokens."""
        out: dict[str, dict] = {}
        with self._lock:
            for (pool, mode), c in self._counts.items():
                row = dict(c)
                if pool != "*":
                    row["mean_accepted_len"] = round(c["accepted_tokens"] / c["drafts"], 3) if c["drafts"] else 0.0
                    for k in ("steps", "generated_tokens"):
                        row.pop(k)
                else:
                    row = {"steps": c["steps"], "generated_tokens": c["generated_tokens"]}
                out.setdefault(mode, {})[pool] = row
        return out

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
