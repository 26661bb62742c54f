"""`python -m benchmarks.bench_dare_span`, tiny, on the real model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_span_times_each_span_per_dtype():
    cmd = [sys.executable, "-m", "benchmarks.bench_dare_span", "--json", "--dtypes",
           "float32,bfloat16", "--spans", "1,4", "--repeats", "1", "--context", "8"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report["ms"]) == {"float32", "bfloat16"} and report["context"] == 8
    for dtype in ("float32", "bfloat16"):
        assert set(report["ms"][dtype]) == {"1", "4"} and min(report["ms"][dtype].values()) > 0
        assert report["relative"][dtype]["1"] == 1.0
    assert report["machine"]["cores"] >= 1
