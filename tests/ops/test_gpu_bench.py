"""ops/gpu/bench_dare.sh, the script a GPU machine runs, in its CPU dry run
(DARE_BENCH_DEVICE=cpu), tiny: its main step on the real model and MovieLens-1M. (The
benchmarks its other steps run have their own tests under tests/benchmarks/.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llm_workers import model_store
from tests.conftest import base_settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "ops" / "gpu" / "bench_dare.sh"


def test_dry_run_writes_the_chosen_steps_reports(tmp_path):
    home = Path(base_settings().home)
    out = tmp_path / "out"
    env = {**os.environ, "DARE_BENCH_DEVICE": "cpu", "PYTHON": sys.executable}
    cmd = [str(SCRIPT), "--data-dir", str(home / "data"),
           "--model-dir", str(model_store.model_dir(home)), "--out", str(out),
           "--steps", "float32", "--",
           "--prompts", "1", "--warm", "2", "--max-new-tokens", "8", "--sample-users", "40",
           "--methods", "plain,strict", "--batch", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.json")) == ["dare-float32.json"]

    bench = json.loads((out / "dare-float32.json").read_text())
    assert bench["dtype"] == "float32" and bench["prompts"] == 1
    assert bench["strict_identical"] is True
    assert bench["hf_generate"]["identical_to_plain"] is True   # the second baseline
    assert "dare-float32.json" in result.stdout


def test_a_missing_model_is_refused_before_any_work(tmp_path):
    result = subprocess.run([str(SCRIPT), "--data-dir", str(tmp_path)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode == 2 and "--model-dir or --gguf" in result.stderr
    assert not list(tmp_path.iterdir())
