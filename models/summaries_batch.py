"""UIL in batch over a replay: the online worker's prompts, parser and backend, run offline.

The CTR evaluation needs the summaries the online path would have written for each user's
first partitions. Rather than a separate summariser, this runs the very same code:
`llm_workers.prompts.cascade_prompt` / `fit_naive_prompt`, a backend from
`llm_workers.backends.create(settings)` and `llm_workers.prompts.parse`, on partitions cut by
`streams.ubsp` (models/ctr_data.py). Differences from the worker, on purpose:

- batches are formed by depth: partition d of every user in one or more calls, since cascade
  step d needs step d-1's profile (the worker batches whatever is queued);
- cold users start with no context (the worker may give them a cluster's collective summary
  once `llm_collective_min_users` users of that cluster are known);
- an answer that cannot be parsed is recorded as failed and the user's profile stays as it
  was (the worker retries, then dead-letters, and also keeps the previous profile).

Results are cached on disk (SQLite under HOME/cache) keyed by mode, model, template version,
generation settings, user, seq and the exact prompt's sha256 (so a changed previous profile is
a different key): a rerun only generates what it has not seen.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from llm_workers import backends, prompts
from llm_workers.prompts import Activity

MODES = ("cascade", "naive")


@dataclass(frozen=True)
class BatchPartition:
    """A closed partition as the batch summariser sees it."""
    user_id: str
    seq: int
    activities: tuple[Activity, ...]
    end_ts: float


@dataclass(frozen=True)
class SummaryText:
    """One parsed answer: the partition's summary and the profile after it."""
    partition_summary: str
    cascaded_summary: str
    shift: str = ""


@dataclass
class BatchStats:
    mode: str
    prompts: int = 0
    cached: int = 0
    generated: int = 0
    failed: int = 0
    calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    generation_s: float = 0.0
    naive_events_dropped: int = 0
    repairs: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class SummaryCache:
    """SQLite key -> JSON; safe to share between processes (WAL, busy timeout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS uil (key TEXT PRIMARY KEY, value TEXT)")
        self.db.commit()

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT value FROM uil WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_many(self, items: Sequence[tuple[str, dict]]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO uil (key, value) VALUES (?, ?)",
                            [(k, json.dumps(v)) for k, v in items])
        self.db.commit()

    def close(self) -> None:
        self.db.close()


def default_cache_path(settings) -> Path:
    return Path(settings.home) / "cache" / "uil-batch.sqlite"


def _key(mode: str, backend, settings, max_new_tokens: int, user_id: str, seq: int,
         prompt: prompts.ChatPrompt) -> str:
    parts = [mode, backend.name, backend.model, prompt.version, str(max_new_tokens),
             str(settings.llm_repetition_penalty), settings.llm_dtype,
             str(settings.llm_max_summary_chars), user_id, str(seq), prompt.sha256()]
    # the block runs in our processes only: not in a vLLM server, nor beside vLLM's drafts
    blocked = backend.name == "transformers" or (
        backend.name == "vllm" and settings.llm_vllm_speculative == "off")
    if settings.llm_no_repeat_ngram and blocked:
        parts.append(f"no-repeat-forms-{settings.llm_no_repeat_ngram}")
    decoding = _decoding(settings, backend.name)
    if decoding:  # greedy and DARE-strict share answers (identical); relaxed ones differ
        parts.append(decoding)
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _decoding(settings, backend_name: str) -> str:
    """The decoding rule when it changes answers: DARE's relaxed verification, '' otherwise."""
    dare_on = (settings.llm_dare if backend_name == "transformers"
               else backend_name.startswith("vllm") and settings.llm_vllm_speculative == "dare")
    if dare_on and settings.dare_mode == "relaxed":
        return f"dare-relaxed-k{settings.dare_top_k}-p{settings.dare_min_prob}"
    return ""


class BatchSummariser:
    """Summarise users' partitions in `mode` (cascade: UIL; naive: the full-history baseline).

    Args:
        settings: LLM settings (backend, model, dtype, threads, title and summary caps,
            `llm_max_prompt_tokens` for naive prompts) are read from here.
        max_new_tokens: answer length cap per partition (the worker uses llm_max_new_tokens).
        batch_size: prompts per generate call.
        backend: an existing backend (else created from settings on first need).
        cache: a SummaryCache (default: HOME/cache/uil-batch.sqlite).
    """

    def __init__(self, settings, *, max_new_tokens: int = 64, batch_size: int = 16,
                 backend: backends.Backend | None = None, cache: SummaryCache | None = None,
                 log: Callable[[str], object] = lambda m: None):
        self.s = backends.resolve(settings)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._backend = backend
        self._owns_backend = backend is None
        self.cache = cache or SummaryCache(default_cache_path(self.s))
        self.log = log
        self.transcript: list[tuple[str, str]] = []   # (prompt's user message, whole answer)
        self.records: list[dict] = []                 # what this summariser generated

    @property
    def backend(self) -> backends.Backend:
        if self._backend is None:
            self._backend = backends.create(self.s)
        return self._backend

    def describe(self) -> dict:
        return {"backend": self.s.llm_backend, "model": self.s.llm_model,
                "template": self.s.llm_template, "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size, "dtype": self.s.llm_dtype,
                "repetition_penalty": self.s.llm_repetition_penalty,
                "no_repeat_ngram_in_answer": self.s.llm_no_repeat_ngram,
                "decoding": ("greedy, labelled lines forced (LineGuide or vLLM's regex guide)"
                             + (f"; {_decoding(self.s, self.s.llm_backend)}"
                                if _decoding(self.s, self.s.llm_backend) else "")),
                "max_title_chars": self.s.llm_max_title_chars,
                "max_summary_chars": self.s.llm_max_summary_chars,
                "naive_max_prompt_tokens": self.s.llm_max_prompt_tokens,
                "cold_user_context": "none (collective summaries not used in batch)"}

    def run(self, partitions: dict[str, Sequence[BatchPartition]], mode: str = "cascade",
            only: dict[str, set[int]] | None = None
            ) -> tuple[dict[str, list[SummaryText | None]], BatchStats]:
        """{user: partitions seq 0..n-1 in order} -> ({user: [summary or None if failed]},
        stats). Every partition given is summarised (callers choose how deep to go), except
        in naive mode with `only`: there each summary stands alone, so just the seqs in
        `only[user]` are (the others come back as None)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        for user, parts in partitions.items():
            if [p.seq for p in parts] != list(range(len(parts))):
                raise ValueError(f"user {user}: partitions must be seq 0, 1, 2 ... in order")
        stats = BatchStats(mode)
        out: dict[str, list[SummaryText | None]] = {u: [] for u in partitions}
        if mode == "cascade":
            profile: dict[str, str | None] = {u: None for u in partitions}
            depth = max((len(p) for p in partitions.values()), default=0)
            for d in range(depth):
                jobs = []
                for user, parts in partitions.items():
                    if d < len(parts):
                        previous = profile[user]
                        prompt = prompts.cascade_prompt(
                            parts[d].activities, context=previous,
                            context_kind=prompts.CONTEXT_PREVIOUS if previous else prompts.CONTEXT_NONE,
                            max_title_chars=self.s.llm_max_title_chars,
                            max_context_chars=self.s.llm_max_summary_chars,
                            template=self.s.llm_template)
                        jobs.append((user, d, prompt, previous))
                for (user, _, _, _), result in zip(jobs, self._answer(jobs, mode, stats)):
                    out[user].append(result)
                    if result is not None:
                        profile[user] = result.cascaded_summary
                self.log(f"cascade depth {d}: {len(jobs)} partitions ({stats.generated} "
                         f"generated, {stats.cached} cached so far)")
        else:
            jobs = []
            for user, parts in partitions.items():
                for d, part in enumerate(parts):
                    if only is not None and d not in only.get(user, ()):
                        continue
                    earlier = [a for p in parts[:d] for a in p.activities]
                    prompt, dropped = prompts.fit_naive_prompt(
                        earlier, part.activities, self.backend.count_tokens,
                        self.s.llm_max_prompt_tokens, max_title_chars=self.s.llm_max_title_chars,
                        template=self.s.llm_template)
                    stats.naive_events_dropped += dropped
                    jobs.append((user, d, prompt, None))
            # similar lengths in one call pad less
            jobs.sort(key=lambda j: len(j[2].user))
            results = self._answer(jobs, mode, stats)
            by_key = {(u, d): r for (u, d, _, _), r in zip(jobs, results)}
            for user, parts in partitions.items():
                out[user] = [by_key.get((user, d)) for d in range(len(parts))]
            self.log(f"naive: {len(jobs)} partitions ({stats.generated} generated, "
                     f"{stats.cached} cached)")
        return out, stats

    def _answer(self, jobs, mode: str, stats: BatchStats) -> list[SummaryText | None]:
        """Cached answers where present, the rest generated in batches and cached."""
        stats.prompts += len(jobs)
        keys = [_key(mode, _BackendId(self.s), self.s, self.max_new_tokens, u, d, p)
                for u, d, p, _ in jobs]
        records = [self.cache.get(k) for k in keys]
        stats.cached += sum(r is not None for r in records)
        todo = [i for i, r in enumerate(records) if r is None]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            batch = [jobs[i][2] for i in chunk]
            generations = self.backend.generate(batch, self.max_new_tokens,
                                                timeout_s=None)
            stats.calls += 1
            fresh = []
            for i, generation in zip(chunk, generations):
                record = self._parse(jobs[i], generation)
                record["seconds"] = round(generation.seconds / len(chunk), 4)
                record["call_s"] = round(generation.seconds, 3)
                records[i] = record
                self.records.append(record)
                fresh.append((keys[i], record))
            self.cache.put_many(fresh)
            stats.generated += len(chunk)
            self.log(f"  {mode}: {stats.generated} generated, last call {len(chunk)} prompts "
                     f"in {generations[0].seconds:.1f}s")
        results = []
        for job, record in zip(jobs, records):
            self.transcript.append((job[2].user, job[2].prefix + record["text"]))
            stats.tokens_in += record["tokens_in"]
            stats.tokens_out += record["tokens_out"]
            stats.generation_s += record.get("seconds", 0.0)
            for repair in record.get("repairs", []):
                stats.repairs[repair] = stats.repairs.get(repair, 0) + 1
            if record.get("error"):
                stats.failed += 1
                results.append(None)
            else:
                results.append(SummaryText(record["summary"], record["profile"], record["shift"]))
        return results

    def _parse(self, job, generation) -> dict:
        _, _, prompt, previous = job
        record = {"text": generation.text, "tokens_in": generation.tokens_in,
                  "tokens_out": generation.tokens_out}
        try:
            parsed = prompts.parse(prompt.prefix + generation.text, prompt.structure or
                                   prompts.CASCADE_LABELS, previous=previous,
                                   max_chars=self.s.llm_max_summary_chars)
        except prompts.MalformedOutput as exc:
            record["error"] = str(exc)
            return record
        record.update(summary=parsed[prompts.SUMMARY], shift=parsed[prompts.SHIFT],
                      profile=parsed[prompts.PROFILE], repairs=list(parsed.repairs))
        return record

    def close(self) -> None:
        """Closes the cache, and the backend when this summariser made it (DARE pools)."""
        self.cache.close()
        if self._owns_backend and self._backend is not None:
            self._backend.close()


class _BackendId:
    """The backend's identity for cache keys, without loading the model to learn it."""

    def __init__(self, settings):
        self.name = settings.llm_backend
        self.model = settings.llm_model
