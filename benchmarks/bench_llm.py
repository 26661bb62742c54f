"""`liber bench llm`: the LLM stage's configurations side by side, on the same partitions.

Each configuration summarises the same MovieLens-1M partitions (the first `users` users with
at least `depth` partitions, their partitions 0..depth-1, in cascade order: depth d of every
user in one round, each user's prompt carrying the profile the configuration itself wrote at
d-1), through the batch path the evaluation uses (models.summaries_batch: the worker's prompts,
parser and backends), with a fresh summary cache so everything is generated. Measured per
configuration, in one run, one after the other:

- prompt and answer tokens per summary, summaries/s and events/s over the generation's wall
  time (model load excluded), LLM tokens per 1,000 events;
- p50 and p95 latency of a summary: the duration of the call that wrote it (a closed
  partition waits for its whole call in the worker too; queueing is not included);
- vLLM's prefix-cache hit rate (the share of prompt tokens served from the cache);
- the summaries' quality figures (models/summary_quality.py) and three example answers.

`old_default` is the worker's configuration before this benchmark existed: transformers,
float32, template uil-kar-v2, calls of 8, 160 answer tokens, no n-gram block; `default` is
today's (`auto`: vLLM with bfloat16 and calls of 64 where the machine has them).

`stream_mix` counts tokens per 1,000 events over whole users' streams, tiny partitions
included, with and without the gap rule's floor (`min_gap_events`).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from core.machine import describe as describe_machine
from llm_workers import backends
from models import ctr_data, summary_quality
from models.summaries_batch import BatchSummariser, SummaryCache
from streams import movielens
from streams import ubsp

OLD_DEFAULT = {"llm_backend": "transformers", "llm_dtype": "float32",
               "llm_template": "uil-kar-v2", "llm_no_repeat_ngram": 0}
OLD_BATCH, OLD_TOKENS = 8, 160


def configurations(settings) -> dict[str, tuple[dict, int, int]]:
    """name -> (settings changes, prompts per call, answer tokens). `default` is what the
    worker runs with the settings as given (`auto` values decided for this machine)."""
    chosen = backends.resolve(settings)
    fast = backends.fastest(settings)
    out = {"old_default": (OLD_DEFAULT, OLD_BATCH, OLD_TOKENS),
           "transformers_v5": ({"llm_template": "uil-compact-v5", "llm_no_repeat_ngram": 3,
                                "llm_backend": "transformers", "llm_dtype": fast.llm_dtype},
                               16, 64)}
    if fast.llm_backend == "vllm":   # the previous default, for the template's own effect
        out["vllm_v4"] = ({"llm_template": "uil-compact-v4", "llm_no_repeat_ngram": 3,
                           "llm_backend": "vllm", "llm_dtype": fast.llm_dtype}, 64, 64)
    out["default"] = ({"llm_backend": chosen.llm_backend, "llm_dtype": chosen.llm_dtype,
                       "llm_vllm_kv_cache_mb": chosen.llm_vllm_kv_cache_mb},
                      chosen.llm_batch_size, chosen.llm_max_new_tokens)
    return out


def partitions(settings, users: int, depth: int) -> dict:
    data_dir = movielens.fetch(settings.home, datasets=("ml-1m",), log=lambda m: None)["ml-1m"]
    catalog = ctr_data.load_catalog(data_dir, "ml-1m")
    histories = ctr_data.group_ratings(movielens.load_ratings(data_dir, "ml-1m"))
    rules = ubsp.CloseRules.from_settings(settings)
    out = {}
    for user in sorted(histories, key=int):
        ctr_data.partition_user(histories[user], rules, dataset="ml-1m")
        if len(histories[user].partitions) >= depth:
            out[user] = ctr_data.batch_partitions(histories[user], catalog, depth)
            if len(out) == users:
                break
    return {"parts": out, "titles": list(catalog.text.values())}


def measure(settings, name: str, changes: dict, batch: int, tokens: int, data: dict,
            log) -> dict:
    s = settings.replace_text({k: str(v) for k, v in changes.items()})
    with tempfile.TemporaryDirectory(prefix="liber-bench-llm-") as tmp:
        cache = SummaryCache(Path(tmp) / "cache.sqlite")
        summariser = BatchSummariser(s, max_new_tokens=tokens, batch_size=batch, cache=cache,
                                     log=lambda m: None)
        try:
            started = time.perf_counter()
            summariser.backend                       # model load, not timed below
            load_s = time.perf_counter() - started
            hits_before = _prefix_counts(summariser.backend)
            started = time.perf_counter()
            _, stats = summariser.run(data["parts"], "cascade")
            wall = time.perf_counter() - started
            hits = _prefix_counts(summariser.backend)
            calls = [r["call_s"] for r in summariser.records]
        finally:
            summariser.close()
    events = sum(len(p.activities) for ps in data["parts"].values() for p in ps)
    n = stats.prompts
    out = {"backend": s.llm_backend, "dtype": s.llm_dtype, "template": s.llm_template,
           "prompts_per_call": batch, "max_new_tokens": tokens,
           "no_repeat_ngram": s.llm_no_repeat_ngram, "summaries": n, "failed": stats.failed,
           "model_load_s": round(load_s, 1), "wall_s": round(wall, 1),
           "prompt_tokens_per_summary": round(stats.tokens_in / n, 1),
           "answer_tokens_per_summary": round(stats.tokens_out / n, 1),
           "summaries_per_s": round(n / wall, 3), "events_per_s": round(events / wall, 2),
           "llm_tokens_per_1k_events": round(1000 * (stats.tokens_in + stats.tokens_out)
                                             / events, 1),
           "latency_p50_s": round(float(np.percentile(calls, 50)), 1),
           "latency_p95_s": round(float(np.percentile(calls, 95)), 1),
           "quality": summary_quality.measure(summariser.transcript, data["titles"],
                                              examples=3)}
    if hits is not None and hits_before is not None and hits[1] > hits_before[1]:
        out["prefix_cache_hit_rate"] = round((hits[0] - hits_before[0])
                                             / (hits[1] - hits_before[1]), 3)
    log(f"{name}: {out['summaries_per_s']} summaries/s, {out['events_per_s']} events/s, "
        f"{out['llm_tokens_per_1k_events']} tokens per 1k events")
    return out


def _prefix_counts(backend) -> tuple[int, int] | None:
    """(prefix-cache hit tokens, queried tokens) of a vLLM engine so far; None elsewhere."""
    metrics = getattr(getattr(backend, "llm", None), "get_metrics", None)
    if metrics is None:
        return None
    values = {m.name: getattr(m, "value", 0) for m in metrics()}
    return (int(values.get("vllm:prefix_cache_hits", 0)),
            int(values.get("vllm:prefix_cache_queries", 0)))


# A cascaded profile of typical length (the answers' PROFILE lines run 150 to 300 characters):
# the context every stream-mix prompt carries.
TYPICAL_PROFILE = ("Enjoys dramas and thrillers with strong characters and classic comedies; "
                   "likes hopeful science fiction adventures, avoids horror and slapstick.")


def stream_mix(settings, answers: dict[str, float], *, users: int = 300, seed: int = 0) -> dict:
    """LLM tokens per 1,000 events over every partition of a seeded sample of MovieLens-1M
    users (all depths, tiny partitions included, as the stream produces them), for each
    template, under the close rules as set and with every cache closed by the gap
    (min_gap_events=1, the rules before the floor). Prompt tokens are counted by the model's
    tokenizer with a typical profile as context; answer tokens per summary are the measured
    ones (`answers`: template -> tokens). No generation: the bench's own partitions are the
    users' first two, which are mostly full ones."""
    import random
    from dataclasses import replace

    from llm_workers import prompts
    data_dir = movielens.fetch(settings.home, datasets=("ml-1m",), log=lambda m: None)["ml-1m"]
    catalog = ctr_data.load_catalog(data_dir, "ml-1m")
    histories = ctr_data.group_ratings(movielens.load_ratings(data_dir, "ml-1m"))
    sample = random.Random(seed).sample(sorted(histories, key=int), users)
    rules = ubsp.CloseRules.from_settings(settings)
    counter = backends.create(settings.replace(llm_backend="transformers", llm_dtype="float32"))
    out: dict = {"users": users}
    try:
        for rule_name, r in (("floor", rules), ("no_floor", replace(rules, min_gap_events=1))):
            parts = []
            for user in sample:
                ctr_data.partition_user(histories[user], r, dataset="ml-1m")
                parts += ctr_data.batch_partitions(histories[user], catalog, 10 ** 6)
            events = sum(len(p.activities) for p in parts)
            row = {"min_gap_events": r.min_gap_events, "partitions": len(parts),
                   "events_per_partition": round(events / len(parts), 2)}
            for template, answer in answers.items():
                tokens = counter.count_tokens_many([prompts.cascade_prompt(
                    p.activities, context=TYPICAL_PROFILE, context_kind=prompts.CONTEXT_PREVIOUS,
                    max_title_chars=settings.llm_max_title_chars, template=template)
                    for p in parts])
                row[template] = round(1000 * (sum(tokens) + answer * len(parts)) / events)
            out[rule_name] = row
    finally:
        counter.close()
    return out


def run(settings, *, users: int = 16, depth: int = 2, only: list[str] | None = None,
        mix_users: int = 300, log=print) -> dict:
    data = partitions(settings, users, depth)
    configs = configurations(settings)
    chosen = {k: v for k, v in configs.items() if not only or k in only}
    results = {name: measure(settings, name, *cfg, data, log) for name, cfg in chosen.items()}
    out = {"benchmark": "llm", "users": len(data["parts"]), "depth": depth,
           "partitions": sum(map(len, data["parts"].values())),
           "events": sum(len(p.activities) for ps in data["parts"].values() for p in ps),
           "configurations": results, "machine": describe_machine(),
           "threads": settings.llm_threads}
    if "old_default" in results:
        old = results["old_default"]
        out["against_old_default"] = {
            name: {"events_per_s_x": round(r["events_per_s"] / old["events_per_s"], 2),
                   "tokens_per_1k_events_x": round(r["llm_tokens_per_1k_events"]
                                                   / old["llm_tokens_per_1k_events"], 3)}
            for name, r in results.items() if name != "old_default"}
    if mix_users:
        answers = {}
        for r in results.values():  # the first measured answer length of each template
            answers.setdefault(r["template"], r["answer_tokens_per_summary"])
        mix = out["stream_mix"] = stream_mix(settings, answers, users=mix_users)
        if "old_default" in results and "default" in results:  # each under its own rules
            new = mix["floor"][results["default"]["template"]]
            mix["default_vs_old_default_x"] = round(
                new / mix["no_floor"][results["old_default"]["template"]], 3)
    return out
