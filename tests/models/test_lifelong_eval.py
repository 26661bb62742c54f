"""The lifelong evaluation end to end without an LLM: base, base_long and aggregate on the
same MovieLens-1M samples (tiny: 14 users, one seed, two epochs)."""
from __future__ import annotations

from core.settings import Settings
from models import lifelong_eval
from models.lifelong_data import LifelongConfig


def test_lifelong_run_compares_variants_on_the_same_samples():
    settings = Settings.load(env={}, drift_threshold=0.0)
    cfg = LifelongConfig(max_history=80, long_window=60)
    out = lifelong_eval.run(settings, users=14, cfg=cfg, seeds=(0,), backbones=("din",),
                            variants=("base", "base_long", "aggregate"), epochs=2,
                            bootstrap=50)
    counts = out["counts"]
    assert counts["users"] == {"train": 10, "val": 2, "test": 2}   # split by user
    assert counts["samples"]["test"] == 2 * 16                    # the last 20% of 80
    assert counts["partitions_behind_test_samples"]["min"] >= 1
    results = out["results"]["din"]
    assert set(results) == {"base", "base_long", "aggregate"}
    lifts = out["lifts"]["din"]
    assert set(lifts) == {"aggregate-base", "base_long-base"}
    boot = lifts["aggregate-base"]["bootstrap_seed_averaged"]
    assert boot["ci95"][0] <= boot["auc_diff"] <= boot["ci95"][1] or boot["rounds"] < 50
    assert set(out["lifts_by_bucket"]["din"]) == {"aggregate-base"}
    assert out["protocol"]["windows"] == {"base": 10, "base_long": 60}
    assert "llm" in out and out["llm"]["settings"] is None        # no LLM variant, no LLM
