"""`liber bench llm-cost`: LLM tokens of cascaded UIL against the naive baseline, same events.

How the numbers are made (also printed in the JSON's `method`):

1. Partitions: the first `users` users of the MovieLens replay (streams.replay.select), their
   ratings in time order through the real UBSP logic (streams.ubsp.add_event with the
   close rules of the settings). Partitions still open at the end are not summarised by either
   mode (`open_events`).
2. Prompts: the real templates (llm_workers.prompts) on the item text the stream worker joins in
   (`Title (Year) [Genres]`), counted with the real tokenizer and chat template
   (backend.count_tokens), every prompt of both modes, exactly.
   - cascade: each partition with the user's previous cascaded summary as context. Summaries are
     only generated for a sample, so the context slot of the other prompts is filled with the real
     generated profiles of the sample, in turn. First partitions get one too when collective
     summaries are on (a cold user's prompt carries the cluster's summary), none otherwise.
   - naive: each partition with the user's whole earlier history, no summary (the baseline's
     definition; the context-capped variant a real 8K-token model would need is reported too).
3. Generated tokens: really generated (greedy, the worker's backend and settings) for a sample:
   the first `gen_sample_depth` partitions of the first `gen_sample_users` users with that many
   partitions, in cascade order (batched across the users), and the naive prompts of the last of
   those partitions. Other calls are counted at the sample's mean tokens_out of their mode.
4. Bound: `token_ratio_items_only_bound` is the ratio if both modes' prompts held nothing but
   their item lines (no template, no summary, no answer), counted in events: the ceiling that
   the close rules and these users' history depths set for any prompt design.
5. Time: `wall_s_sample` is the measured time of the sample calls. `wall_s` extrapolates to all
   calls run one at a time: prefill seconds/token (a 1-token generation of a real prompt) times
   tokens_in plus decode seconds/token (one full generation alone) times tokens_out; attention's
   growth with length is ignored, which flatters naive.
"""
from __future__ import annotations

import time
from statistics import mean

from core.settings import Settings
from llm_workers import backends, prompts
from llm_workers.prompts import Activity
from streams import movielens, replay
from streams import ubsp

CHUNK = 128


def _partitions(settings: Settings, dataset: str, users: int, log):
    data_dir = movielens.fetch(settings.home, datasets=(dataset,), log=lambda m: None)[dataset]
    ratings = replay.select(movielens.load_ratings(data_dir, dataset), users=users)
    text = {m.item_id: replay.movie_item(m).text() for m in movielens.load_items(data_dir, dataset)}
    rules = ubsp.CloseRules.from_settings(settings)
    states: dict[str, dict] = {}
    parts: dict[str, list[list[Activity]]] = {}
    for r in ratings:
        state = states.setdefault(r.user_id, ubsp.new_state())
        _, closed = ubsp.add_event(state, r.user_id, f"{dataset}:{r.line}", r.item_id, "rate",
                                   float(r.ts), r.rating, rules)
        for part in closed:
            parts.setdefault(part.user_id, []).append(
                [Activity(text.get(e.item_id, f"item {e.item_id}"), e.action, e.value)
                 for e in part.events])
    open_events = sum(len(s["events"]) for s in states.values())
    log(f"{dataset}: {len(ratings)} events of {len(states)} users -> "
        f"{sum(map(len, parts.values()))} partitions ({open_events} events still open)")
    return ratings, parts, open_events, rules


def _count(backend, prompt_iter, total: int, label: str, log) -> list[int]:
    counts, chunk, started = [], [], time.monotonic()
    for prompt in prompt_iter:
        chunk.append(prompt)
        if len(chunk) == CHUNK:
            counts += backend.count_tokens_many(chunk)
            chunk = []
            if len(counts) % (CHUNK * 20) == 0:
                log(f"{label}: {len(counts)}/{total} prompts counted")
    counts += backend.count_tokens_many(chunk) if chunk else []
    log(f"{label}: {total} prompts, {sum(counts):,} tokens in {time.monotonic() - started:.0f}s")
    return counts


def run(settings: Settings, *, dataset: str = "ml-1m", users: int = 1000,
        gen_sample_users: int = 4, gen_sample_depth: int = 3, naive_sample: int = 3,
        log=print) -> dict:
    started = time.monotonic()
    s = settings
    ratings, parts, open_events, rules = _partitions(s, dataset, users, log)
    order = list(parts)  # users by first appearance
    backend = backends.create(s)
    max_new = s.llm_max_new_tokens
    opts = dict(max_title_chars=s.llm_max_title_chars)
    collective_on = s.llm_collective_min_users > 0

    # --- real generations: cascade chains, then naive on the same partitions -----------------
    sampled = [u for u in order if len(parts[u]) >= gen_sample_depth][:gen_sample_users]
    profiles: dict[str, str | None] = {u: None for u in sampled}
    measured: dict[tuple[str, int], tuple[int, int]] = {}  # (user, seq) -> (in, out), cascade
    samples, cascade_sample_s = [], 0.0
    for depth in range(gen_sample_depth):
        batch = [prompts.cascade_prompt(
            parts[u][depth], context=profiles[u],
            context_kind=prompts.CONTEXT_PREVIOUS if profiles[u] else prompts.CONTEXT_NONE,
            max_context_chars=s.llm_max_summary_chars, **opts) for u in sampled]
        gens = backend.generate(batch, max_new, timeout_s=s.llm_timeout_s)
        cascade_sample_s += gens[0].seconds
        for u, g in zip(sampled, gens):
            parsed = prompts.parse(batch[0].prefix + g.text, previous=profiles[u],
                                   max_chars=s.llm_max_summary_chars)
            profiles[u] = parsed[prompts.PROFILE]
            measured[u, depth] = (g.tokens_in, g.tokens_out)
            samples.append({"user": u, "seq": depth, "tokens_in": g.tokens_in,
                            "tokens_out": g.tokens_out, "profile": profiles[u]})
        log(f"cascade sample depth {depth}: {len(batch)} prompts in {gens[0].seconds:.1f}s")
    pool = [x["profile"] for x in samples] or [""]
    naive_users = sampled[:naive_sample]
    naive_measured: dict[tuple[str, int], tuple[int, int]] = {}
    naive_sample_s = 0.0
    if naive_users:
        depth = gen_sample_depth - 1
        batch = [prompts.naive_prompt([a for p in parts[u][:depth] for a in p], parts[u][depth],
                                      **opts) for u in naive_users]
        gens = backend.generate(batch, max_new, timeout_s=s.llm_timeout_s)
        naive_sample_s = gens[0].seconds
        for u, g in zip(naive_users, gens):
            naive_measured[u, depth] = (g.tokens_in, g.tokens_out)
        log(f"naive sample: {len(batch)} prompts in {naive_sample_s:.1f}s")

    # --- calibration for the time estimate (one prompt alone) --------------------------------
    first = prompts.cascade_prompt(parts[order[0]][0], context=pool[0],
                                   context_kind=prompts.CONTEXT_PREVIOUS, **opts)
    prefill = backend.generate([first], 1, timeout_s=s.llm_timeout_s)[0]
    full = backend.generate([first], max_new, timeout_s=s.llm_timeout_s)[0]
    prefill_rate = prefill.seconds / prefill.tokens_in
    decode_rate = max(full.seconds - prefill.seconds, 0.0) / max(full.tokens_out - 1, 1)

    # --- every prompt of both modes, counted --------------------------------------------------
    keys = [(u, k) for u in order for k in range(len(parts[u]))]

    def cascade_prompts():
        for i, (u, k) in enumerate(keys):
            context = pool[i % len(pool)] if (k > 0 or collective_on) else None
            kind = prompts.CONTEXT_PREVIOUS if k > 0 else prompts.CONTEXT_COLLECTIVE
            yield prompts.cascade_prompt(parts[u][k], context=context, context_kind=kind,
                                         max_context_chars=s.llm_max_summary_chars, **opts)

    def naive_prompts():
        for u in order:
            earlier: list[Activity] = []
            for part in parts[u]:
                yield prompts.naive_prompt(earlier, part, **opts)
                earlier = earlier + part

    cascade_in = _count(backend, cascade_prompts(), len(keys), "cascade", log)
    naive_in = _count(backend, naive_prompts(), len(keys), "naive", log)
    for i, key in enumerate(keys):  # the sampled calls count with what really ran
        if key in measured:
            cascade_in[i] = measured[key][0]
        if key in naive_measured:
            naive_in[i] = naive_measured[key][0]

    def mode(counts, sampled_calls, sample_s, label):
        out_mean = mean(o for _, o in sampled_calls.values()) if sampled_calls else float(max_new)
        tokens_out = [sampled_calls[k][1] if k in sampled_calls else out_mean for k in keys]
        t_in, t_out = sum(counts), round(sum(tokens_out))
        return {"calls": len(keys), "tokens_in": t_in, "tokens_out": t_out,
                "tokens": t_in + t_out,
                "wall_s": round(prefill_rate * t_in + decode_rate * t_out, 1),
                "wall_s_sample": round(sample_s, 2),
                "generated_calls": len(sampled_calls),
                "tokens_out_per_call_measured": round(out_mean, 1),
                "tokens_in_per_call": round(t_in / max(len(keys), 1), 1),
                "cost": round(t_in / 1000 * s.llm_price_in_per_1k +
                              t_out / 1000 * s.llm_price_out_per_1k, 6)}

    cascade = mode(cascade_in, measured, cascade_sample_s, "cascade")
    naive = mode(naive_in, naive_measured, naive_sample_s, "naive")
    depth_of = [k for _, k in keys]
    by_depth = {}
    for name, lo, hi in (("0-4", 0, 4), ("5-19", 5, 19), ("20-49", 20, 49), ("50+", 50, 1 << 30)):
        idx = [i for i, d in enumerate(depth_of) if lo <= d <= hi]
        if idx:
            c = sum(cascade_in[i] for i in idx) + cascade["tokens_out_per_call_measured"] * len(idx)
            n = sum(naive_in[i] for i in idx) + naive["tokens_out_per_call_measured"] * len(idx)
            by_depth[name] = {"calls": len(idx), "token_ratio": round(n / c, 2)}
    # The most any prompt design could reach with these partitions: every prompt holding only
    # its item lines (no template, no summary, no answer), counted in events.
    naive_events = sum(sum(len(p) for p in parts[u][:k + 1]) for u, k in keys)
    cascade_events = sum(len(parts[u][k]) for u, k in keys)
    limit = s.llm_max_prompt_tokens
    capped = sum(min(n, limit) for n in naive_in)
    return {
        "dataset": dataset, "users": len({r.user_id for r in ratings}), "events": len(ratings),
        "events_in_closed_partitions": sum(len(p) for u in order for p in parts[u]),
        "open_events": open_events, "partitions": len(keys),
        "close_rules": {"max_events": rules.max_events, "max_gap_s": rules.max_gap_s,
                        "max_span_s": rules.max_span_s},
        "backend": backend.name, "model": backend.model, "template": prompts.TEMPLATE_VERSION,
        "max_new_tokens": max_new,
        "cascade": cascade, "naive": naive,
        "token_ratio": round(naive["tokens"] / cascade["tokens"], 2),
        "token_ratio_in": round(naive["tokens_in"] / cascade["tokens_in"], 2),
        "token_ratio_by_history_depth": by_depth,
        "token_ratio_items_only_bound": round(naive_events / max(cascade_events, 1), 2),
        "naive_context_capped": {"max_prompt_tokens": limit, "tokens_in": capped,
                                 "prompts_over_limit": sum(n > limit for n in naive_in),
                                 "token_ratio": round((capped + naive["tokens_out"]) /
                                                      cascade["tokens"], 2)},
        "timing": {"prefill_s_per_token": round(prefill_rate, 6),
                   "decode_s_per_token": round(decode_rate, 6)},
        "sample_profiles": [{k: x[k] for k in ("user", "seq", "tokens_out", "profile")}
                            for x in samples[: 2 * len(sampled)]][:4],
        "method": ("UBSP over the MovieLens replay; every prompt of both modes counted with the "
                   "real tokenizer and chat template; tokens_out generated for "
                   f"{len(measured)} cascade and {len(naive_measured)} naive prompts "
                   "(greedy), the other calls at their mode's sample mean; cascade context slots "
                   "filled with the sample's real profiles; wall_s = measured prefill and decode "
                   "seconds per token times the tokens, calls one at a time"),
        "bench_wall_s": round(time.monotonic() - started, 1),
    }
