"""`python -m benchmarks.bench_dare_backend`: what LIBER_LLM_DARE=1 buys the LLM worker.

The worker's own transformers backend three times (plain; DARE strict; DARE relaxed), on the
worker's own prompts (`prompts.cascade_prompt`) over MovieLens-1M partitions, with the worker's
decoding settings (repetition penalty `LIBER_LLM_REPETITION_PENALTY`, `LineGuide`) and batches of
`--batch` prompts per call, as the worker sends them. Partitions are planned as in
`liber bench dare` (bench.py): the DARE backends first answer the warm-up partitions (feeding
their pools, each in its own temporary state directory), the plain backend's answers to them
give the measured partitions their previous profile; then the measured batches run
round-robin over the three backends. Prints one JSON object: tok/s per backend (wall clock of
the calls), speedups against plain, mean accepted draft length, answers equal to plain's, and
whether every answer parses with the worker's parser. `--reference-dtype float32` adds a fourth
backend, plain in that dtype, in the same round-robin (e.g. bfloat16 runs against the float32
worker), with each backend's speedup against it.
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_dare_backend",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="measured partitions (one per user)")
    p.add_argument("--warm", type=int, default=8, help="warm-up partitions fed to the pools")
    p.add_argument("--batch", type=int, default=4, help="prompts per backend call")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: setting llm_max_new_tokens")
    p.add_argument("--partition-events", type=int, default=10)
    p.add_argument("--sample-users", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   default="auto", help="the three backends' dtype (auto: the worker's choice)")
    p.add_argument("--reference-dtype", choices=["float32", "bfloat16", "float16"],
                   help="also run plain decoding in this dtype, as a reference")
    p.add_argument("--json", action="store_true", help="print JSON only (the default here)")
    args = p.parse_args(argv)
    print(json.dumps(run(args), indent=2))
    return 0


def run(args) -> dict:
    from core.settings import Settings
    from llm_workers import backends, prompts
    from llm_workers.backends.base import resolve
    from benchmarks.bench_dare import _partitions, _plan
    from llm_workers.prompts import Activity
    from streams import movielens
    from streams.replay import movie_item

    # the transformers backend whatever the default (DARE here is the in-process decoder's)
    base = resolve(Settings.load(llm_threads=1, llm_backend="transformers",
                                 llm_dtype=args.dtype))
    max_new = args.max_new_tokens or base.llm_max_new_tokens
    data_dir = Path(base.home) / "data"
    ratings = movielens.load_ratings(data_dir, "ml-1m")
    movies = {m.item_id: m for m in movielens.load_items(data_dir, "ml-1m")}
    users = sorted({r.user_id for r in ratings})
    sample = set(random.Random(args.seed).sample(users, min(args.sample_users, len(users))))
    warm_parts, measured_parts = _plan(_partitions(ratings, sample, args.partition_events),
                                       args.prompts, args.warm, args.seed)

    def prompt(part, previous):
        acts = [Activity(movie_item(movies[e.item_id]).text(), "rate", float(e.value))
                for e in part.events]
        kind = prompts.CONTEXT_PREVIOUS if previous else prompts.CONTEXT_NONE
        return prompts.cascade_prompt(acts, context=previous, context_kind=kind)

    modes = ("plain", "strict", "relaxed") + (("reference",) if args.reference_dtype else ())
    tmp = tempfile.TemporaryDirectory(prefix="dare-backend-bench-")
    made = {}
    try:
        for mode in modes:
            dare = mode in ("strict", "relaxed")
            made[mode] = backends.create(base.replace(
                state_dir=os.path.join(tmp.name, mode), llm_dare=int(dare),
                dare_mode=mode if dare else "off",
                llm_dtype=args.reference_dtype if mode == "reference" else base.llm_dtype))
        warm_prompts = [prompt(part, None) for part in warm_parts]
        profiles = {}
        t = time.perf_counter()
        for mode, backend in made.items():
            if mode == "reference":                 # nothing to warm, no profiles needed
                continue
            for i in range(0, len(warm_prompts), args.batch):
                gens = backend.generate(warm_prompts[i:i + args.batch], max_new)
                if mode == "plain":
                    for part, p_, g in zip(warm_parts[i:i + args.batch],
                                           warm_prompts[i:i + args.batch], gens):
                        profiles[(part.user_id, part.seq)] = prompts.parse(p_.prefix + g.text)["PROFILE"]
            if backend.dare is not None:
                backend.dare.decoder.stats.reset()
        warm_s = time.perf_counter() - t
        measured = [prompt(part, profiles.get((part.user_id, part.seq - 1)))
                    for part in measured_parts]
        wall = dict.fromkeys(modes, 0.0)
        answers = {m: [] for m in modes}
        for i in range(0, len(measured), args.batch):       # round-robin per batch
            for mode, backend in made.items():
                t = time.perf_counter()
                answers[mode].extend(backend.generate(measured[i:i + args.batch], max_new))
                wall[mode] += time.perf_counter() - t
        report = {"benchmark": "dare-backend", "prompts": len(measured), "warm": len(warm_parts),
                  "batch": args.batch, "max_new_tokens": max_new, "dtype": base.llm_dtype,
                  "reference_dtype": args.reference_dtype,
                  "repetition_penalty": base.llm_repetition_penalty,
                  "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "warm_s": round(warm_s, 1)}
        tokens = {m: sum(g.tokens_out for g in answers[m]) for m in modes}
        rate = {m: tokens[m] / wall[m] for m in modes}
        for mode, backend in made.items():
            row = {"tokens": tokens[mode], "seconds": round(wall[mode], 2),
                   "tok_s": round(rate[mode], 2),
                   "speedup": round(rate[mode] / rate["plain"], 3),
                   "same_as_plain": sum(a.text == b.text for a, b in
                                        zip(answers[mode], answers["plain"])),
                   "all_parse": all(_parses(prompts, p_, g) for p_, g in
                                    zip(measured, answers[mode]))}
            if args.reference_dtype:
                row["speedup_vs_reference"] = round(rate[mode] / rate["reference"], 3)
            if backend.dare is not None:
                counts = backend.dare.decoder.stats.snapshot().get(mode, {})
                drafts = sum(c["drafts"] for pool, c in counts.items() if pool != "*")
                accepted = sum(c["accepted_tokens"] for pool, c in counts.items() if pool != "*")
                row["mean_accepted_len"] = round(accepted / drafts, 3) if drafts else 0.0
                row["pools"] = len(backend.dare.store.names())
            report[mode] = row
            report[f"{mode}_tok_s"] = row["tok_s"]
        for mode in ("strict", "relaxed"):
            report[f"{mode}_speedup"] = report[mode]["speedup"]
        report["strict_identical"] = report["strict"]["same_as_plain"] == len(measured)
        return report
    finally:
        for backend in made.values():
            backend.close()
        tmp.cleanup()


def _parses(prompts, prompt, generation) -> bool:
    try:
        prompts.parse(prompt.prefix + generation.text)
        return True
    except prompts.MalformedOutput:
        return False


if __name__ == "__main__":
    sys.exit(main())
