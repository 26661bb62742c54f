"""`liber bench summaries`: would a person accept the summaries the configured worker writes?

The settings' own LLM configuration (LIBER_LLM_*; `--fastest` takes the fastest backend here
instead) summarises the same MovieLens-1M partitions as `liber bench llm`, and the quality
figures of models/summary_quality.py are printed with five example answers: share of answers
with a repeated 3-gram loop, distinct-2, invented-title share, genre precision, mean length.
"""
from __future__ import annotations

from benchmarks import bench_llm
from core.machine import describe as describe_machine
from llm_workers import backends


def run(settings, *, users: int = 16, depth: int = 2, fastest: bool = False, log=print) -> dict:
    settings = backends.fastest(settings) if fastest else backends.resolve(settings)
    data = bench_llm.partitions(settings, users, depth)
    batch = 64 if settings.llm_backend.startswith("vllm") else settings.llm_batch_size
    result = bench_llm.measure(settings, "settings", {}, batch, settings.llm_max_new_tokens,
                               data, log)
    quality = result.pop("quality")
    quality["examples"] = [a for a in quality["examples"]]
    return {"benchmark": "summaries", "partitions": result["summaries"], **quality,
            "generation": result, "machine": describe_machine()}
