"""`python -m benchmarks.bench_dare_span`: what one verification pass costs per draft length.

DARE pays off when a forward pass over 1 + k new tokens costs little more than a pass over 1.
This times one pass of the LLM backend's model over `span` new tokens after a cached prompt of
`--context` tokens, per dtype (median of `--repeats`, one torch thread by default), and prints
one JSON object: milliseconds per span and each span's cost relative to span 1.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def measure(model, spans, context: int, repeats: int) -> dict[int, float]:
    import torch

    from llm_workers.dare.decoder import _new_cache, _prefill
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (1, context), generator=g).to(model.device)
    # CUDA runs asynchronously: time from an idle device to the pass's last kernel.
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    out = {}
    with torch.inference_mode():
        cache = _new_cache(model)                    # untimed: first-use set-up (CUDA, kernels)
        _prefill(model, prompt, cache)
        model(input_ids=prompt[:, :max(spans)], past_key_values=cache, use_cache=True)
        for span in spans:
            times = []
            for _ in range(repeats):
                cache = _new_cache(model)
                _prefill(model, prompt, cache)
                step = torch.randint(100, 40000, (1, span), generator=g).to(model.device)
                sync()
                t = time.perf_counter()
                model(input_ids=step, past_key_values=cache, use_cache=True)
                sync()
                times.append(time.perf_counter() - t)
            out[span] = round(statistics.median(times) * 1000, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_dare_span", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--spans", default="1,2,4,8,16")
    p.add_argument("--context", type=int, default=700, help="cached prompt tokens")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", action="store_true", help="print JSON only (the default here)")
    args = p.parse_args(argv)
    import torch

    from core import machine
    from core.settings import Settings
    from llm_workers import model_store
    settings = Settings.load()
    if settings.llm_threads:
        torch.set_num_threads(settings.llm_threads)
    spans = [int(s) for s in args.spans.split(",")]
    report = {"benchmark": "dare-span", "model": settings.llm_model, "device": settings.llm_device,
              "context": args.context, "repeats": args.repeats, "ms": {}, "relative": {}}
    for dtype in args.dtypes.split(","):
        model, _ = model_store.load(settings.home, settings.llm_model,
                                    device=settings.llm_device, dtype=dtype)
        ms = measure(model, spans, args.context, args.repeats)
        report["ms"][dtype] = ms
        report["relative"][dtype] = {s: round(v / ms[spans[0]], 2) for s, v in ms.items()}
    report["machine"] = machine.describe()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
