"""`liber eval` (lifelong protocol): is an LLM's view of the whole history worth its cost?

The protocol is models/lifelong_data.py's: long MovieLens-1M histories, samples late in each,
a ranker that sees only the last `window` ratings. On the same samples, each backbone (DIN,
DCNv2) with 3 seeds:

    base       the backbone with the short window
    base_long  the backbone with a long window: what widening the window buys, at its cost
               per request (scoring time per sample is reported)
    aggregate  no LLM: each partition and the whole earlier history condensed to rating-weighted
               means of item-text vectors, through the same fusion and adaptor as `liber`
    liber      cascaded UIL summaries (the worker's prompts, parser and backend, batch path)
               through UIF: the latest K partition summaries and the cascaded profile
    naive      the same with full-history summaries (each partition re-summarises the whole
               history up to the model's context); opt in, its prompts are long

Reported: AUC and LogLoss (mean, std), per-seed paired differences and bootstrap 95% CIs over
test users for liber-base, liber-aggregate, liber-base_long, aggregate-base (and naive-liber);
the same lifts by history depth and by how many ratings the user has; LLM tokens per 1,000
events; the summaries' quality figures (models/summary_quality.py); counts and the machine.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from models import ctr_data, evaluation, lifelong_data, summary_quality, training
from models.ctr_data import VectorTable
from models.lifelong_data import AggregateTable, LifelongConfig
from models.prepare import drift_rule
from models.summaries_batch import BatchSummariser
from models.text_encoder import DIM, TextEncoder
from models.split_tensors import SplitTensors
from streams import movielens
from streams import ubsp

VARIANTS = ("base", "base_long", "aggregate", "liber", "naive")
DEFAULT_VARIANTS = ("base", "base_long", "aggregate", "liber")
SOURCE_OF = {"aggregate": "aggregate", "liber": "cascade", "naive": "naive"}
NAIVE_CONTEXT = 4096   # the vLLM backend's max_model_len
COMPARISONS = (("liber", "base"), ("liber", "aggregate"), ("liber", "base_long"),
               ("aggregate", "base"), ("base_long", "base"), ("naive", "liber"))


def choose_users(histories: dict, cfg: LifelongConfig, n_users: int, seed: int) -> list[str]:
    """`n_users` users with at least `min_ratings` ratings, in a seeded random order."""
    long = {u: h for u, h in histories.items() if len(h.ts) >= cfg.min_ratings}
    return ctr_data.shuffled_users(long, seed)[:n_users]


def prepare(settings, *, users: int, cfg: LifelongConfig, k: int, sources, data_seed: int,
            max_new_tokens: int, batch_size: int, log: Callable[[str], object]) -> dict:
    dataset = "ml-1m"
    data_dir = movielens.fetch(settings.home, datasets=(dataset,), log=lambda m: None)[dataset]
    catalog = ctr_data.load_catalog(data_dir, dataset)
    all_histories = ctr_data.group_ratings(movielens.load_ratings(data_dir, dataset))
    eligible = sum(len(h.ts) >= cfg.min_ratings for h in all_histories.values())
    chosen = choose_users(all_histories, cfg, users, data_seed)
    histories = {u: lifelong_data.cut(all_histories[u], cfg.max_history) for u in chosen}
    rules = ubsp.CloseRules.from_settings(settings)
    drift = drift_rule(settings, catalog, histories.values()) \
        if settings.drift_threshold > 0 else None
    for h in histories.values():
        ctr_data.partition_user(h, rules, drift=drift, dataset=dataset)
    split = ctr_data.split_users(chosen)
    log(f"{dataset}: {eligible} users with >= {cfg.min_ratings} ratings; {len(chosen)} drawn "
        f"(train {len(split['train'])}, val {len(split['val'])}, test {len(split['test'])})")
    samples = {name: lifelong_data.build_samples([histories[u] for u in ids], catalog, cfg)
               for name, ids in split.items()}
    depth = {u: lifelong_data.partitions_needed(h) for u, h in histories.items()}
    parts = {u: ctr_data.batch_partitions(histories[u], catalog, depth[u]) for u in chosen}
    out = {"catalog": catalog, "histories": histories, "split": split, "samples": samples,
           "ratings_total": {u: len(all_histories[u].ts) for u in chosen},
           "depth": depth, "parts": parts, "eligible": eligible, "matrices": {}, "lookups": {},
           "summaries": {}, "stats": {}, "drift": drift is not None}
    encoder = TextEncoder()
    if "aggregate" in sources:
        used = sorted({i for h in histories.values() for i in h.item_ids})
        vectors = encoder.encode([catalog.text.get(i, f"item {i}") for i in used])
        table = AggregateTable(k, dict(zip(used, vectors)), DIM)
        for u in chosen:
            table.add_user(histories[u], depth[u])
        out["matrices"]["aggregate"] = table.matrix()
        out["lookups"]["aggregate"] = {n: table.lookup(s) for n, s in samples.items()}
    llm_sources = [s for s in sources if s in ("cascade", "naive")]
    if llm_sources:
        # naive prompts must leave room for the answer in vLLM's 4,096-token context
        llm_settings = settings.replace(llm_max_prompt_tokens=min(
            settings.llm_max_prompt_tokens, NAIVE_CONTEXT - max_new_tokens - 16))
        summariser = BatchSummariser(llm_settings, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, log=log)
        out["stats"]["summariser"] = summariser.describe()
        try:
            for source in llm_sources:
                started = time.monotonic()
                summariser.transcript = []
                by_user, stats = summariser.run(
                    parts, source, only=_naive_needed(samples, k) if source == "naive" else None)
                wall = time.monotonic() - started
                events = _events_covered(parts, by_user, source)
                out["summaries"][source] = by_user
                out["stats"][source] = {
                    **stats.as_dict(), "wall_s": round(wall, 1),
                    "summaries_per_s_generated": round(stats.generated / wall, 3)
                    if stats.generated and wall > 0 else None,
                    "events_summarised": events,
                    "llm_tokens_per_1k_events": round(1000 * (stats.tokens_in + stats.tokens_out)
                                                      / max(1, events), 1),
                    "tokens_in_per_summary": round(stats.tokens_in / max(1, stats.prompts), 1),
                    "tokens_out_per_summary": round(stats.tokens_out / max(1, stats.prompts), 1),
                    "quality": summary_quality.measure(summariser.transcript,
                                                       list(catalog.text.values()))}
                if source == "naive":
                    out["stats"][source]["every_close_tokens_per_1k_events"] = \
                        _naive_every_close(summariser, parts, stats)
                log(f"{source}: {stats.prompts} summaries ({stats.generated} generated in "
                    f"{wall:.0f}s, {stats.cached} cached, {stats.failed} failed)")
                table = VectorTable(k)
                for u in chosen:
                    table.add_user(u, by_user[u], depth[u])
                out["matrices"][source] = table.matrix(encoder.encode, DIM)
                out["lookups"][source] = {n: table.lookup(s) for n, s in samples.items()}
        finally:
            summariser.close()
    return out


def _naive_every_close(summariser: BatchSummariser, parts: dict, stats) -> float:
    """What naive costs in production, where every close re-reads the history: the prompt
    tokens of every partition's naive prompt (counted, not generated) plus the mean answer,
    per 1,000 events."""
    from llm_workers import prompts
    s = summariser.s
    tokens, events, closes = 0, 0, 0
    for ps in parts.values():
        for d, part in enumerate(ps):
            earlier = [a for p in ps[:d] for a in p.activities]
            prompt, _ = prompts.fit_naive_prompt(
                earlier, part.activities, summariser.backend.count_tokens,
                s.llm_max_prompt_tokens, max_title_chars=s.llm_max_title_chars,
                template=s.llm_template)
            tokens += summariser.backend.count_tokens(prompt)
            events += len(part.activities)
            closes += 1
    answer = stats.tokens_out / max(1, stats.prompts)
    return round(1000 * (tokens + answer * closes) / max(1, events), 1)


def _naive_needed(samples: dict, k: int) -> dict[str, set[int]]:
    """The partitions whose naive summaries some sample reads: the latest k before it."""
    needed: dict[str, set[int]] = {}
    for s in samples.values():
        for u, known in zip(s.user, s.known):
            needed.setdefault(s.users[u], set()).update(range(max(0, known - k), known))
    return needed


def _events_covered(parts: dict, by_user: dict, source: str) -> int:
    """Events the summaries of `source` describe: every summarised partition's own events for
    the cascade; for naive, each summary re-reads the whole history, but the events it covers
    are counted once per user, up to the deepest partition summarised."""
    total = 0
    for user, ps in parts.items():
        done = [i for i, x in enumerate(by_user[user]) if x is not None] \
            if source == "naive" else range(len(ps))
        if source == "naive":
            total += sum(len(p.activities) for p in ps[: max(done) + 1]) if done else 0
        else:
            total += sum(len(p.activities) for p in ps)
    return total


def _tensors(data: dict, variant: str, cfg: LifelongConfig) -> dict:
    window = cfg.long_window if variant == "base_long" else cfg.window
    source = SOURCE_OF.get(variant)
    return {name: SplitTensors(lifelong_data.with_window(s, window),
                               data["lookups"][source][name] if source else None,
                               data["matrices"][source] if source else None)
            for name, s in data["samples"].items()}


def _tertiles(values: np.ndarray, name: str) -> dict[str, np.ndarray]:
    low, high = (np.quantile(values, [1 / 3, 2 / 3]) if len(values) else (0, 0))
    groups = {f"{name} <= {low:g}": values <= low,
              f"{name} {low:g}-{high:g}": (values > low) & (values <= high),
              f"{name} > {high:g}": values > high}
    return {k: v for k, v in groups.items() if v.any()}


def buckets(data: dict) -> dict[str, np.ndarray]:
    """Test samples in thirds by partitions behind them (history depth) and by the user's
    ratings in all of MovieLens (how active, or sparse, the user is)."""
    test = data["samples"]["test"]
    ratings = np.asarray([data["ratings_total"][test.users[u]] for u in test.user])
    return {**_tertiles(test.known, "partitions"), **_tertiles(ratings, "user ratings")}


def run(settings, *, users: int = 300, cfg: LifelongConfig = LifelongConfig(), k: int = 2,
        seeds=(0, 1, 2), backbones=evaluation.BACKBONES, variants=DEFAULT_VARIANTS,
        max_new_tokens: int = 64, batch_size: int = 64, epochs: int = 15, patience: int = 2,
        bootstrap: int = 1000, data_seed: int = 0, log: Callable[[str], object] = lambda m: None
        ) -> dict:
    started = time.monotonic()
    load_start, uptime_start = evaluation.load(), evaluation.uptime()
    sources = tuple(SOURCE_OF[v] for v in variants if v in SOURCE_OF)
    data = prepare(settings, users=users, cfg=cfg, k=k, sources=sources, data_seed=data_seed,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, log=log)
    prepare_s = round(time.monotonic() - started, 1)
    test = data["samples"]["test"]
    results: dict = {}
    lifts: dict = {}
    by_bucket: dict = {}
    groups = buckets(data)
    for backbone in backbones:
        results[backbone], probs = {}, {}
        for variant in variants:
            config = training.model_config(backbone, data["catalog"],
                                           interest=variant in SOURCE_OF, k=k)
            results[backbone][variant], seed_probs = evaluation.fit_seeds(
                config, data["catalog"], _tensors(data, variant, cfg), seeds, epochs=epochs,
                patience=patience, log=lambda m, v=variant: log(f"{backbone}/{v} {m}"))
            probs.update({(variant, s): p for s, p in seed_probs.items()})
        lifts[backbone], by_bucket[backbone] = {}, {}
        for other, base in COMPARISONS:
            if other in variants and base in variants:
                name = f"{other}-{base}"
                lifts[backbone][name] = evaluation.lift(test.label, test.user, probs, seeds,
                                                        base, other, bootstrap)
                if (other, base) in (("liber", "base"), ("liber", "aggregate"),
                                     ("aggregate", "base")):
                    by_bucket[backbone][name] = _by_bucket(test, probs, seeds, base, other,
                                                           groups, bootstrap)
    out = {
        "dataset": "ml-1m",
        "protocol": _protocol(settings, cfg, k, seeds, epochs, patience, data),
        "counts": _counts(data),
        "llm": {"settings": data["stats"].get("summariser"),
                **{s: data["stats"][s] for s in ("cascade", "naive") if s in data["stats"]}},
        "results": results,
        "lifts": lifts,
        "lifts_by_bucket": by_bucket,
        "timing_s": {"prepare_incl_summaries": prepare_s,
                     "total": round(time.monotonic() - started, 1)},
        "machine": evaluation.machine(load_start, uptime_start),
    }
    out["notes"] = _notes(out)
    return out


def _by_bucket(test, probs, seeds, base, other, groups, rounds) -> dict:
    base_mean = np.mean([probs[base, s] for s in seeds], axis=0)
    other_mean = np.mean([probs[other, s] for s in seeds], axis=0)
    out = {}
    for name, mask in groups.items():
        idx = np.flatnonzero(mask)
        if len(np.unique(test.label[idx])) < 2 or len(np.unique(test.user[idx])) < 3:
            out[name] = {"samples": int(len(idx)), "auc_diff": None}
            continue
        boot = evaluation.bootstrap_diff(test.label[idx], test.user[idx], base_mean[idx],
                                         other_mean[idx], rounds)
        out[name] = {"samples": int(len(idx)), "users": int(len(np.unique(test.user[idx]))),
                     "auc_diff": boot["auc_diff"], "ci95": boot["ci95"]}
    return out


def _protocol(settings, cfg, k, seeds, epochs, patience, data) -> dict:
    return {
        "name": "lifelong",
        "label": "rating > 3",
        "users": f"MovieLens-1M users with >= {cfg.min_ratings} ratings, seeded random draw; "
                 f"each history cut to its first {cfg.max_history} ratings",
        "split": "by user 70/15/15: no test user's behaviour, summaries or vectors train the "
                 "ranker or the fusion; all splits sample the same late part of each history",
        "samples": f"the last {cfg.sample_share:.0%} of each (cut) history",
        "windows": {"base": cfg.window, "base_long": cfg.long_window},
        "vectors": f"from every partition closed strictly before the sample (latest {k} "
                   "partition vectors + the lifelong one) -> attention fusion -> hybrid-expert "
                   "adaptor -> the backbone",
        "leakage": "everything a sample uses has ts strictly below the sample's",
        "partitions": "streams.ubsp (UBSP) with the settings' close rules (max_events "
                      f"{settings.max_events}, max_gap_s {settings.max_gap_s}, max_span_s "
                      f"{settings.max_span_s}, drift "
                      f"{settings.drift_threshold if data['drift'] else 'off'})",
        "seeds": list(seeds), "epochs_max": epochs, "early_stopping_patience": patience,
    }


def _counts(data: dict) -> dict:
    summaries = {src: {"ok": data["stats"][src]["prompts"] - data["stats"][src]["failed"],
                       "failed": data["stats"][src]["failed"]} for src in data["summaries"]}
    depth = np.asarray(list(data["depth"].values()))
    return {
        "eligible_users": data["eligible"],
        "users": {n: len(ids) for n, ids in data["split"].items()},
        "samples": {n: len(s) for n, s in data["samples"].items()},
        "positive_rate": {n: round(float(s.label.mean()), 4) for n, s in data["samples"].items()},
        "partitions_behind_test_samples": {
            "mean": round(float(data["samples"]["test"].known.mean()), 2),
            "min": int(data["samples"]["test"].known.min()),
            "max": int(data["samples"]["test"].known.max())},
        "partitions_per_user": {"mean": round(float(depth.mean()), 2), "max": int(depth.max())},
        "summaries": summaries,
    }


def _notes(out: dict) -> list[str]:
    return [evaluation.lift_note(f"{backbone} {name}", entry)
            for backbone, by_name in out["lifts"].items() for name, entry in by_name.items()]
