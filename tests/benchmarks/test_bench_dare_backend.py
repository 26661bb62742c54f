"""`python -m benchmarks.bench_dare_backend`, tiny: the worker's backend on real MovieLens-1M
partitions and the real model, plain vs DARE, with a plain reference in another dtype."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_backend_compares_the_worker_backends_in_one_run():
    cmd = [sys.executable, "-m", "benchmarks.bench_dare_backend", "--json", "--prompts", "2",
           "--warm", "2", "--batch", "2", "--max-new-tokens", "16", "--sample-users", "60",
           "--dtype", "float32", "--reference-dtype", "bfloat16"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert (report["dtype"], report["reference_dtype"]) == ("float32", "bfloat16")
    assert report["prompts"] == 2 and report["warm"] == 2 and report["batch"] == 2
    for mode in ("plain", "strict", "relaxed", "reference"):
        row = report[mode]
        assert 0 < row["tokens"] <= 32 and row["tok_s"] > 0 and row["all_parse"], mode
        assert row["speedup_vs_reference"] > 0
    assert report["reference"]["speedup_vs_reference"] == 1.0
    assert report["strict_identical"] is True and report["strict"]["same_as_plain"] == 2
    assert "mean_accepted_len" in report["strict"] and "mean_accepted_len" not in report["plain"]
