"""`liber bench dare --json` end to end, tiny: real MovieLens-1M partitions and the real model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_dare_prints_the_comparison_json(tmp_path):
    cmd = [sys.executable, "-m", "liber.cli", "bench", "dare", "--json", "--prompts", "2",
           "--warm", "3", "--max-new-tokens", "12", "--sample-users", "80",
           "--methods", "plain,strict,relaxed,global_strict", "--pool-dir", str(tmp_path),
           "--batch", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("plain_tok_s", "strict_tok_s", "relaxed_tok_s", "strict_speedup",
                "relaxed_speedup", "global_strict_speedup", "mean_accepted_len", "machine"):
        assert key in report, key
    assert report["strict_identical"] is True and report["global_strict_identical"] is True
    assert report["prompts"] == 2 and report["warm_generations"] == 3
    assert set(report["tokens"]) == {"plain", "strict", "relaxed", "global_strict"}
    assert all(0 < n <= 24 for n in report["tokens"].values())
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch_threads"] >= 1
    strict = report["methods"]["strict"]
    assert strict["drafts"] >= 1 and strict["accepted_tokens"] <= strict["draft_tokens"]
    assert report["pools"]["persisted"]["reloaded_equal"] is True
    assert (tmp_path / "pools" / "CURRENT").exists()
    batch = report["batch"]                 # the two prompts stepped together
    assert batch["size"] == 2 and batch["batches"] == 1
    for key in ("plain_tok_s", "strict_tok_s", "relaxed_tok_s", "strict_speedup",
                "relaxed_speedup", "plain_batch_speedup"):
        assert batch[key] > 0, key
    assert batch["strict_identical"] is True and batch["plain"]["same_as_single_plain"] is True
    assert batch["strict"]["tokens"] == report["tokens"]["plain"]


def test_bench_fallback_defaults_follow_the_settings():
    from core.settings import Settings
    from benchmarks.bench_dare import FALLBACK_DEFAULTS
    defaults = Settings.load(env={})
    assert {k: getattr(defaults, k) for k in FALLBACK_DEFAULTS} == FALLBACK_DEFAULTS


def test_bench_path_imports_no_service_dependencies():
    """The GPU script runs the bench where only torch and transformers exist."""
    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in ('faust', 'kafka', 'rocksdict', 'prometheus_client', 'pyarrow'):\n"
            "        raise ModuleNotFoundError('blocked ' + name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import benchmarks.bench_dare, llm_workers.dare.decoder, llm_workers.dare.pools\n"
            "import llm_workers.dare.metrics, llm_workers.dare.routing, llm_workers.dare.uil_prompts\n"
            "import streams.movielens, streams.ubsp\n"
            "from llm_workers.dare.pools import PoolStore\n"
            "s = PoolStore(); s.add(['a'], [1, 2, 3]); assert s.draft([1, 2], ['a'], 2).tokens == [3]\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
