"""`liber bench dare`: DARE against plain greedy decoding on cascaded UIL prompts (MovieLens-1M).

Steps, all in one process on one device:
 1. ML-1M ratings of a seeded sample of users are cut into UBSP partitions (streams.ubsp);
    users are clustered by k-means over genre histograms of their items (all users).
 2. Warm-up: the earlier partitions (first partitions of the measured users, first and second
    partitions of other users) are summarised in stream order with DARE-strict (its output is
    the greedy output), feeding every generation online into its pools: `cluster:<k>`, the
    partition's top `genre:<g>` pools, and `global`. With rocksdict present the pools live in
    RocksDB and are reopened from disk before measuring.
 3. Measured: each measured user's next partition, whose prompt carries the warm-up summary as
    previous summary. Methods run round-robin per prompt (plain, strict, relaxed, then the
    global-pool ablation), each on its own copy of the warm pools fed online as it goes.

 4. Batch (`--batch N`, default 4; 0 skips): the same measured prompts again, N at a time
    stepped together (`DareDecoder.generate_batch`), plain, strict and relaxed round-robin per
    batch, each on a fresh copy of the warm pools; reported under `batch` with its speedups
    against batched plain, `plain_batch_speedup` (batched plain against one-at-a-time plain)
    and whether each row's tokens equal the one-at-a-time plain output.

`--repetition-penalty P` applies the LLM worker's repetition penalty (HF's processor) to every
method, as the worker's transformers backend does with `LIBER_LLM_REPETITION_PENALTY` (default
1.0, none; it was 1.15 before); the default 1.0 keeps plain greedy decoding.

Timing: wall clock per request, prefill included (`tok_s`), plus decode-only and CPU-time
figures; on CPU one torch thread by default (THREADS_NOTE). `strict_identical` compares strict
with plain token by token; `same_tokens_share` gives the position-wise agreement per method.
With --pool-dir pointing at an existing directory the pools found there are reused (warm start).

Imports only torch, transformers and this repository's pure-Python modules (rocksdict and
prometheus-client are optional), so it runs on a bare GPU machine with PYTHONPATH=repo.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from core import machine

METHODS = {  # name: (mode, pools: "routed" | "global" | None)
    "plain": ("plain", None),
    "strict": ("strict", "routed"),
    "relaxed": ("relaxed", "routed"),
    "global_strict": ("strict", "global"),
    "global_relaxed": ("relaxed", "global"),
}
DEFAULT_METHODS = ["plain", "strict", "relaxed", "global_relaxed"]
THREADS_NOTE = ("one torch thread on CPU by default: on a shared machine OpenMP's barrier waits "
                "for a descheduled second thread and steps slow down ~10x at random, which makes "
                "timings meaningless; a single thread only slows down in proportion to the load")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=8, help="measured prompts (one per user)")
    p.add_argument("--warm", type=int, default=16, help="warm-up generations fed to the pools")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--draft-len", type=int, default=None, help="default: setting dare_draft_len")
    p.add_argument("--top-k", type=int, default=None, help="relaxed rule k (setting dare_top_k)")
    p.add_argument("--min-prob", type=float, default=None, help="relaxed rule floor (dare_min_prob)")
    p.add_argument("--clusters", type=int, default=None, help="k-means clusters (dare_clusters)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from {', '.join(METHODS)}")
    p.add_argument("--no-context-pool", action="store_true",
                   help="draft from the retrieval pools only, not from the request's own text")
    p.add_argument("--hf-baseline", action="store_true",
                   help="also time transformers' generate() (greedy) on the measured prompts")
    p.add_argument("--batch", type=int, default=4,
                   help="also run plain, strict and relaxed with this many requests stepped "
                        "together (0: skip)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="repetition penalty for every method (LIBER_LLM_REPETITION_PENALTY)")
    p.add_argument("--partition-events", type=int, default=10, help="UBSP max_events for the bench")
    p.add_argument("--sample-users", type=int, default=600, help="users sampled from ML-1M")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--data-dir", help="directory holding ml-1m/ (default HOME/data)")
    p.add_argument("--model-dir", help="a local transformers model directory (default: the cached "
                                       "SmolLM2-135M-Instruct)")
    p.add_argument("--pool-dir", help="RocksDB directory for the pools (default: a temp dir)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1, see THREADS_NOTE; on CUDA: torch's)")
    p.add_argument("--vllm", default="",
                   help="also run vLLM rows, one engine per child process: 'all' or a comma list "
                        "from vllm_plain, vllm_dare_strict, vllm_dare_relaxed, vllm_ngram, "
                        "vllm_suffix (vllm_plain is added; see benchmarks/bench_dare_vllm.py)")
    p.add_argument("--vllm-timeout", type=float, default=1800, help="seconds per vLLM row")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--verbose", action="store_true", help="progress lines on stderr")


def _log(args, msg: str) -> None:
    if args.verbose:
        print(f"[bench dare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- data ----------------------------------------------------------------------------------
def _partitions(ratings, users: set, max_events: int):
    from streams.ubsp import CloseRules, add_event, new_state
    rules = CloseRules(max_events=max_events)
    states: dict[str, dict] = {}
    closed = []
    for r in ratings:
        if r.user_id not in users:
            continue
        state = states.setdefault(r.user_id, new_state())
        _, done = add_event(state, r.user_id, f"{r.user_id}:{r.line}", r.item_id, "rate", r.ts,
                            r.rating, rules)
        closed.extend(done)
    return closed  # in stream order (a close happens at the event that closes it)


def _user_vectors(ratings, movies, vocab):
    from llm_workers.dare.routing import group_histogram
    per_user: dict[str, list] = {}
    for r in ratings:
        per_user.setdefault(r.user_id, []).append(movies[r.item_id].genres)
    return {u: group_histogram(g, vocab) for u, g in per_user.items()}


def _plan(closed, prompts: int, warm: int, seed: int):
    """(warm-up partitions in stream order, measured partitions): the measured users' first
    partitions warm up, their second ones are measured; other users' first two warm up."""
    by_user: dict[str, list] = {}
    for c in closed:
        by_user.setdefault(c.user_id, []).append(c)
    users = sorted(u for u, parts in by_user.items() if len(parts) >= 2)
    random.Random(seed).shuffle(users)
    if len(users) < prompts:
        raise SystemExit(f"only {len(users)} sampled users have two partitions; raise --sample-users")
    measured_users, others = users[:prompts], users[prompts:]
    warm_parts = [by_user[u][0] for u in measured_users][:warm]
    for u in others:
        if len(warm_parts) >= warm:
            break
        warm_parts.extend(by_user[u][:min(2, warm - len(warm_parts))])
    order = {id(c): i for i, c in enumerate(closed)}
    warm_parts.sort(key=lambda c: order[id(c)])
    return warm_parts, [by_user[u][1] for u in measured_users]


# --- the run -------------------------------------------------------------------------------
def run(args, settings) -> dict:
    import torch
    from llm_workers.dare.decoder import DareDecoder
    from llm_workers.dare.metrics import DareStats
    from llm_workers.dare.pools import PoolConfig, PoolStore
    from llm_workers.dare.routing import GLOBAL_POOL, PoolRouter, group_histogram, kmeans
    from llm_workers.dare import uil_prompts
    from streams import movielens

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "plain" not in methods:
        raise SystemExit(f"--methods needs plain and names from {list(METHODS)}; got {methods}")
    draft_len = settings.dare_draft_len if args.draft_len is None else args.draft_len
    top_k = settings.dare_top_k if args.top_k is None else args.top_k
    min_prob = settings.dare_min_prob if args.min_prob is None else args.min_prob
    n_clusters = settings.dare_clusters if args.clusters is None else args.clusters
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or (1 if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    timings = {}
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    t = time.perf_counter()
    model, tokenizer = _load_model(args, settings, device)
    timings["model_load_s"] = round(time.perf_counter() - t, 2)
    _log(args, f"model loaded on {device} in {timings['model_load_s']} s")

    t = time.perf_counter()
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else Path(settings.home) / "data"
    if not any((d / "ratings.dat").exists() and (d / "movies.dat").exists()
               for d in (data_dir, data_dir / "ml-1m")):
        raise SystemExit(f"no MovieLens-1M ratings.dat and movies.dat in {data_dir} or "
                         f"{data_dir / 'ml-1m'} (fetch with `liber data fetch`, or pass --data-dir)")
    ratings = movielens.load_ratings(data_dir, "ml-1m")
    movies = {m.item_id: m for m in movielens.load_items(data_dir, "ml-1m")}
    vocab = sorted({g for m in movies.values() for g in m.genres})
    users = sorted({r.user_id for r in ratings})
    sample = set(random.Random(args.seed).sample(users, min(args.sample_users, len(users))))
    closed = _partitions(ratings, sample, args.partition_events)
    vectors = _user_vectors(ratings, movies, vocab)
    ids = sorted(vectors)
    router = PoolRouter(kmeans([vectors[u] for u in ids], n_clusters, seed=args.seed),
                        groups_per_request=settings.dare_genre_pools)
    warm_parts, measured_parts = _plan(closed, args.prompts, args.warm, args.seed)
    timings["data_s"] = round(time.perf_counter() - t, 2)
    _log(args, f"{len(closed)} partitions of {len(sample)} users; warm {len(warm_parts)}, "
               f"measured {len(measured_parts)} ({timings['data_s']} s)")

    history: dict[str, list] = {}   # user -> genres of items seen so far (for the user vector)

    def request(part, previous):
        items = [movies[e.item_id] for e in part.events]
        history.setdefault(part.user_id, []).extend(m.genres for m in items)
        vec = group_histogram(history[part.user_id], vocab)
        rows = [(m.title, m.genres, e.value) for m, e in zip(items, part.events)]
        return (uil_prompts.prompt_ids(tokenizer, rows, previous),
                router.pools(vec, [m.genres for m in items]))

    pool_config = PoolConfig(max_ngram=settings.dare_max_ngram, max_tokens=settings.dare_pool_max_tokens)
    tmp = None
    pool_dir = args.pool_dir
    try:
        import rocksdict  # noqa: F401
        if pool_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="dare-pools-")
            pool_dir = tmp.name
    except ImportError:
        pool_dir = None
    store = PoolStore(str(Path(pool_dir) / "pools") if pool_dir else None, pool_config)
    store.put_meta("router", router.to_meta())
    stats = DareStats()
    common = dict(top_k=top_k, min_prob=min_prob, context_pool=not args.no_context_pool, stats=stats)

    # Warm the device (first calls are slow) without touching pools.
    warmup = DareDecoder(model, None, "plain", **common)
    warmup.generate(request(measured_parts[0], None)[0][:64], max_new_tokens=8)
    history.clear()

    t = time.perf_counter()
    warm_decoder = DareDecoder(model, store, "strict", draft_len=draft_len, **common)
    summaries: dict[tuple, str] = {}
    warm_tokens = 0
    for i, part in enumerate(warm_parts):
        previous = summaries.get((part.user_id, part.seq - 1))
        prompt, pools = request(part, previous)
        gen = warm_decoder.generate(prompt, pools, args.max_new_tokens)
        warm_decoder.feed(prompt, gen.tokens, pools + [GLOBAL_POOL])
        summaries[(part.user_id, part.seq)] = uil_prompts.next_context(
            tokenizer.decode(gen.tokens, skip_special_tokens=True))
        warm_tokens += len(gen.tokens)
        _log(args, f"warm {i + 1}/{len(warm_parts)}: {len(gen.tokens)} tokens, {gen.total_s:.2f} s, "
                   f"mean accepted {gen.mean_accepted_len:.2f}")
    timings["warm_s"] = round(time.perf_counter() - t, 2)
    warm_stats = stats.snapshot()
    stats.reset()

    persisted = None
    if store.path:
        before = store.stats()
        store.close()
        t = time.perf_counter()
        store = PoolStore(store.path, pool_config)
        persisted = {"path": store.path, "reloaded_equal": store.stats() == before,
                     "reload_s": round(time.perf_counter() - t, 3),
                     "router_reloaded": store.get_meta("router") == router.to_meta()}

    requests = []
    for part in measured_parts:
        prompt, pools = request(part, summaries.get((part.user_id, part.seq - 1)))
        requests.append((prompt, pools))

    decoders = {}
    for name in methods:
        mode, which = METHODS[name]
        pools = store.clone() if which else None
        decoders[name] = (DareDecoder(model, pools, mode, draft_len=draft_len,
                                      **{**common, "stats": DareStats()}), which)

    processor = _penalty(args.repetition_penalty)
    results = {name: [] for name in methods}
    for i, (prompt, pools) in enumerate(requests):
        for name in methods:
            decoder, which = decoders[name]
            names = pools if which == "routed" else [GLOBAL_POOL] if which == "global" else []
            gen = decoder.generate(prompt, names, args.max_new_tokens, logits_processor=processor)
            decoder.feed(prompt, gen.tokens, names)
            results[name].append(gen)
        _log(args, f"prompt {i + 1}/{len(requests)} ({len(prompt)} tokens): " + ", ".join(
            f"{n} {len(results[n][-1].tokens) / results[n][-1].total_s:.1f} tok/s" for n in methods))

    batch = None
    if args.batch > 0:
        batch = _batch_rows(args, model, store, requests, draft_len, common, results["plain"],
                            processor)

    hf = None
    if args.hf_baseline:
        hf = _hf_generate(model, requests, args.max_new_tokens, warmup.eos, results["plain"],
                          args.repetition_penalty)

    per_pool = {name: decoders[name][0].stats.snapshot().get(METHODS[name][0], {}) for name in methods}
    report = _report(args, results, methods, per_pool, requests, device, model, torch)
    if args.vllm:
        report.update(_vllm_rows(args, settings, store, requests, sorted(warmup.eos), vocab,
                                 results, draft_len, top_k, min_prob, threads))
    report["machine"]["load_avg_1m_at_start"] = load_at_start
    if device == "cpu" and not args.threads:
        report["machine"]["threads_note"] = THREADS_NOTE
    report.update(draft_len=draft_len, top_k=top_k, min_prob=min_prob, clusters=len(router.centroids),
                  context_pool=not args.no_context_pool, warm_generations=len(warm_parts),
                  warm_tokens=warm_tokens, warm_stats=warm_stats, timings=timings,
                  pools={"count": len(store.names()),
                         "tokens": sum(s["tokens"] for s in store.stats().values()),
                         "persisted": persisted},
                  example={"pools": requests[0][1],
                           "plain": tokenizer.decode(results["plain"][0].tokens, skip_special_tokens=True),
                           **({"relaxed": tokenizer.decode(results["relaxed"][0].tokens,
                                                           skip_special_tokens=True)}
                              if "relaxed" in results else {})})
    report["repetition_penalty"] = args.repetition_penalty
    if batch is not None:
        report["batch"] = batch
    if hf is not None:
        report["hf_generate"] = hf
    store.close()
    if tmp is not None:
        tmp.cleanup()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _vllm_rows(args, settings, store, requests, eos, vocab, results, draft_len, top_k,
               min_prob, threads) -> dict:
    """vLLM's rows, measured after ours in the same run on the same prompts (vllm_bench.py)."""
    import subprocess
    from benchmarks import bench_dare_vllm as vllm_bench
    from llm_workers.dare.pools import PoolStore
    from llm_workers.dare.vllm_proposer import VOCAB_META
    wanted = list(vllm_bench.METHODS) if args.vllm == "all" else \
        ["vllm_plain"] + [m.strip() for m in args.vllm.split(",") if m.strip() and m.strip() != "vllm_plain"]
    unknown = [m for m in wanted if m not in vllm_bench.METHODS]
    if unknown:
        raise SystemExit(f"--vllm: unknown {unknown}; choose from {list(vllm_bench.METHODS)}")
    if args.model_dir:
        model_dir = str(Path(args.model_dir).expanduser())
    else:
        from llm_workers import model_store
        model_dir = str(model_store.model_dir(settings.home))
    rows, skipped = {}, {}
    with tempfile.TemporaryDirectory(prefix="dare-vllm-") as tmp:
        for method in wanted:
            why = vllm_bench.available(method)
            if why:
                skipped[method] = why
                continue
            job = {"method": method, "model_dir": model_dir, "dtype": args.dtype,
                   "prompts": [p for p, _ in requests], "max_new_tokens": args.max_new_tokens,
                   "eos": eos, "draft_len": max(1, draft_len), "top_k": top_k, "min_prob": min_prob,
                   "context_pool": not args.no_context_pool,
                   "genre_pools": settings.dare_genre_pools, "max_ngram": settings.dare_max_ngram}
            if "dare" in method:   # its own copy of the warm pools, fed online as it goes
                copy = PoolStore(str(Path(tmp) / f"{method}-pools"), store.config)
                for name in store.names():
                    for _, tokens in store.pool(name).sequences():   # oldest first
                        copy.add([name], tokens)
                copy.put_meta("router", store.get_meta("router"))
                copy.put_meta(VOCAB_META, vocab)
                copy.close()
                job["pool_dir"] = str(Path(tmp) / f"{method}-pools")
            job_path, out_path = Path(tmp) / f"{method}.json", Path(tmp) / f"{method}.out.json"
            job_path.write_text(json.dumps(job))
            _log(args, f"vLLM row {method} ...")
            env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            if threads:   # the same thread count as our rows (see THREADS_NOTE): oneDNN's
                env.setdefault("OMP_NUM_THREADS", str(threads))   # OpenMP otherwise takes all
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_dare_vllm",
                                   str(job_path), str(out_path)], capture_output=True, text=True,
                                  timeout=args.vllm_timeout, env=env)
            if proc.returncode != 0 or not out_path.exists():
                skipped[method] = "failed: " + proc.stderr.strip()[-600:]
                continue
            rows[method] = json.loads(out_path.read_text())
            _log(args, f"vLLM row {method}: {sum(map(len, rows[method]['tokens']))} tokens in "
                       f"{sum(rows[method]['seconds']):.1f} s")
    out = {"vllm": {}, "vllm_skipped": skipped}
    plain_ref = [g.tokens for g in results["plain"]]
    base = rows.get("vllm_plain")
    for method, row in rows.items():
        tokens, secs = sum(len(t) for t in row["tokens"]), sum(row["seconds"])
        summary = {"tokens": tokens, "seconds": round(secs, 3), "tok_s": round(tokens / secs, 2),
                   "start_s": row["start_s"], "drafts": row["drafts"],
                   "draft_tokens": row["draft_tokens"], "accepted_tokens": row["accepted_tokens"],
                   "mean_accepted_len": round(row["accepted_tokens"] / row["drafts"], 3)
                   if row["drafts"] else 0.0,
                   "same_tokens_share_vs_our_plain": round(
                       sum(a == b for t, p in zip(row["tokens"], plain_ref) for a, b in zip(t, p))
                       / max(1, sum(len(p) for p in plain_ref)), 3)}
        if base is not None:
            base_rate = sum(len(t) for t in base["tokens"]) / sum(base["seconds"])
            summary["speedup_vs_vllm_plain"] = round(summary["tok_s"] / base_rate, 3)
            summary["identical_to_vllm_plain"] = row["tokens"] == base["tokens"]
        for extra in ("relaxed_promoted", "per_pool"):
            if extra in row:
                summary[extra] = row[extra]
        out["vllm"][method] = summary
        out[f"{method}_tok_s"] = summary["tok_s"]
        if method != "vllm_plain" and "speedup_vs_vllm_plain" in summary:
            out[f"{method}_speedup"] = summary["speedup_vs_vllm_plain"]
    if "vllm_dare_strict" in out["vllm"] and base is not None:
        out["vllm_dare_strict_identical"] = out["vllm"]["vllm_dare_strict"]["identical_to_vllm_plain"]
    return out


def _penalty(value: float):
    """The worker's repetition penalty as a logits processor (None at 1.0: plain greedy)."""
    if value == 1.0:
        return None
    from transformers import RepetitionPenaltyLogitsProcessor
    return RepetitionPenaltyLogitsProcessor(value)


def _batch_rows(args, model, store, requests, draft_len, common, plain_single, processor) -> dict:
    """Plain, strict and relaxed with `args.batch` requests stepped together, round-robin per
    batch, each on its own copy of the warm pools fed after every batch (see the module doc)."""
    import torch
    from llm_workers.dare.decoder import DareDecoder
    from llm_workers.dare.metrics import DareStats
    size = args.batch
    names = ("plain", "strict", "relaxed")
    decoders = {n: DareDecoder(model, store.clone() if n != "plain" else None, n,
                               draft_len=draft_len, **{**common, "stats": DareStats()})
                for n in names}
    gens = {n: [] for n in names}
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    for i in range(0, len(requests), size):
        chunk = requests[i:i + size]
        for n in names:
            t, c = time.perf_counter(), time.process_time()
            got = decoders[n].generate_batch([p for p, _ in chunk], [pools for _, pools in chunk],
                                             args.max_new_tokens, feed=n != "plain",
                                             logits_processors=[processor] * len(chunk))
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            wall[n] += time.perf_counter() - t
            cpu[n] += time.process_time() - c
            gens[n].extend(got)
        _log(args, f"batch {i // size + 1}: " + ", ".join(
            f"{n} {sum(len(g.tokens) for g in gens[n][-len(chunk):])} tokens" for n in names))
    single = [g.tokens for g in plain_single]
    out: dict = {"size": size, "batches": -(-len(requests) // size)}
    for n in names:
        tokens = sum(len(g.tokens) for g in gens[n])
        drafts = sum(g.drafts for g in gens[n])
        accepted = sum(g.accepted_tokens for g in gens[n])
        out[n] = {"tokens": tokens, "seconds": round(wall[n], 3),
                  "tok_s": round(tokens / wall[n], 2),
                  "tok_per_cpu_s": round(tokens / cpu[n], 2) if cpu[n] else 0.0,
                  "steps": sum(g.steps for g in gens[n]),
                  "mean_accepted_len": round(accepted / drafts, 3) if drafts else 0.0,
                  "same_as_single_plain": [g.tokens for g in gens[n]] == single}
        out[f"{n}_tok_s"] = out[n]["tok_s"]
    for n in ("strict", "relaxed"):
        out[f"{n}_speedup"] = round(out[n]["tok_s"] / out["plain"]["tok_s"], 3)
    single_s = sum(g.total_s for g in plain_single)
    out["plain_batch_speedup"] = round(
        out["plain"]["tok_s"] / (sum(map(len, single)) / single_s), 3) if single_s else 0.0
    out["strict_identical"] = out["strict"]["same_as_single_plain"]
    return out


def _hf_generate(model, requests, max_new_tokens, eos, plain, repetition_penalty=1.0):
    import torch
    total_t, total_n, same = 0.0, 0, True
    with torch.inference_mode():
        for (prompt, _), ref in zip(requests, plain):
            ids = torch.tensor([prompt], device=model.device)
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                                 pad_token_id=sorted(eos)[0],
                                 repetition_penalty=repetition_penalty)
            if ids.device.type == "cuda":
                torch.cuda.synchronize()
            total_t += time.perf_counter() - t
            toks = out[0, len(prompt):].tolist()
            total_n += len(toks)
            same &= toks == ref.tokens
    return {"tok_s": round(total_n / total_t, 2), "tokens": total_n, "identical_to_plain": same}


def _machine(device, torch) -> dict:
    out = machine.describe()
    out["load_avg_1m_at_end"] = out.pop("load_avg_1m", None)
    out.update(torch_threads=torch.get_num_threads(), device=device, torch=torch.__version__)
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _report(args, results, methods, stats, requests, device, model, torch) -> dict:
    def summary(gens):
        tokens = sum(len(g.tokens) for g in gens)
        secs = sum(g.total_s for g in gens)
        decode = sum(g.total_s - g.prefill_s for g in gens)
        drafts = sum(g.drafts for g in gens)
        acc = sum(g.accepted_tokens for g in gens)
        steps = sum(g.steps for g in gens)
        cpu = sum(g.cpu_s for g in gens)
        return {"tokens": tokens, "seconds": round(secs, 3), "tok_s": round(tokens / secs, 2),
                "cpu_seconds": round(cpu, 3), "tok_per_cpu_s": round(tokens / cpu, 2),
                "decode_tok_s": round(sum(len(g.tokens) - 1 for g in gens) / decode, 2) if decode else 0.0,
                "steps": steps, "tokens_per_step": round((tokens - len(gens)) / steps, 3) if steps else 0.0,
                "drafts": drafts, "draft_tokens": sum(g.draft_tokens for g in gens),
                "accepted_tokens": acc,
                "mean_accepted_len": round(acc / drafts, 3) if drafts else 0.0,
                "acceptance_rate": round(acc / max(1, sum(g.draft_tokens for g in gens)), 3)}

    per = {m: summary(results[m]) for m in methods}
    for m in methods:
        if m != "plain":
            per[m]["per_pool"] = {p: c for p, c in stats[m].items() if p != "*"}
        per[m]["speedup"] = round(per[m]["tok_s"] / per["plain"]["tok_s"], 3)
        per[m]["cpu_time_speedup"] = round(per[m]["tok_per_cpu_s"] / per["plain"]["tok_per_cpu_s"], 3)
    plain = [g.tokens for g in results["plain"]]
    report = {"benchmark": "dare", "machine": _machine(device, torch),
              "model": getattr(model.config, "_name_or_path", "") or args.model_dir,
              "dtype": args.dtype, "prompts": len(requests),
              "prompt_tokens_mean": round(sum(len(p) for p, _ in requests) / len(requests), 1),
              "max_new_tokens": args.max_new_tokens,
              "tokens": {m: per[m]["tokens"] for m in methods}}
    for m in methods:
        report[f"{m}_tok_s"] = per[m]["tok_s"]
        if m != "plain":
            report[f"{m}_speedup"] = per[m]["speedup"]
    report["mean_accepted_len"] = {m: per[m]["mean_accepted_len"] for m in methods if m != "plain"}
    for m in methods:
        if METHODS[m][0] == "strict":
            key = "strict_identical" if m == "strict" else f"{m}_identical"
            report[key] = [g.tokens for g in results[m]] == plain
    # position-wise share of each method's tokens equal to plain greedy's (1.0: identical)
    report["same_tokens_share"] = {
        m: round(sum(a == b for g, p in zip(results[m], plain) for a, b in zip(g.tokens, p))
                 / max(1, sum(len(p) for p in plain)), 3) for m in methods if m != "plain"}
    report["methods"] = per
    return report


def _settings():
    """The project's Settings; on a bare machine without Python 3.11's tomllib, the DARE
    defaults (kept equal to core/settings.py's by tests/benchmarks/test_bench_dare.py) and
    LIBER_HOME."""
    try:
        from core.settings import Settings
    except ImportError:
        from types import SimpleNamespace
        home = os.environ.get("LIBER_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "liber-stream")
        return SimpleNamespace(home=home, **FALLBACK_DEFAULTS)
    return Settings.load()


FALLBACK_DEFAULTS = dict(dare_draft_len=15, dare_top_k=2, dare_min_prob=0.1, dare_clusters=8,
                         dare_genre_pools=2, dare_max_ngram=8, dare_pool_max_tokens=50_000)


def _load_model(args, settings, device):
    """(model, tokenizer): --model-dir loaded directly (any transformers version), else the
    project's model store (SmolLM2-135M-Instruct, converted once from the GGUF package)."""
    if not args.model_dir:
        from llm_workers import model_store
        return model_store.load(settings.home, model_store.DEFAULT_MODEL, device=device, dtype=args.dtype)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(args.model_dir).expanduser()
    if not (path / "config.json").exists():
        raise SystemExit(f"--model-dir {path}: no config.json (not a transformers model directory)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    dtype = getattr(torch, args.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except TypeError:                      # transformers < 4.56 spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype)
    return model.to(device).eval(), tokenizer


def main(argv=None, settings=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_dare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON only (the default here)")
    args = parser.parse_args(argv)
    if settings is None:
        settings = _settings()
    print(json.dumps(run(args, settings), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
