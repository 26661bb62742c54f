"""`liber eval`: does UIF lift CTR models on MovieLens? The papers' comparison, measured.

For each backbone (DIN, DCNv2) and each variant, 3 seeds (model init and batch order; the data
and user split are fixed), trained with early stopping on validation AUC and scored on the
test users:

    base       the backbone alone (candidate item, history items with their ratings)
    liber      + UIF vector from cascaded UIL summaries (latest K partition summaries + profile)
    naive      + UIF vector from naive summaries (each close re-summarises the whole history)
    item_text  + UIF vector from the partitions' own item text, no LLM (a diagnostic: does the
               LLM add anything over encoding what the user rated?)

Significance of each lift over `base`: the paired per-seed AUC differences (mean, std, t and
two-sided p over the seeds), and a bootstrap over test *users* (resampled with replacement,
predictions averaged over seeds) giving a 95% CI of the AUC difference.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

import numpy as np

from core.machine import describe as describe_machine
from models import training
from models.ctr_metrics import auc, logloss
from models.split_tensors import SplitTensors
from models.training import TrainConfig

VARIANTS = ("base", "liber", "naive", "item_text")
SOURCE_OF = {"liber": "cascade", "naive": "naive", "item_text": "item_text"}
BACKBONES = ("din", "dcnv2")


def load() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1m": round(one, 2), "loadavg_5m": round(five, 2),
            "loadavg_15m": round(fifteen, 2)}


def uptime() -> str:
    try:
        import subprocess
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def paired(diffs: list[float]) -> dict:
    n = len(diffs)
    mean = float(np.mean(diffs))
    if n < 2:
        return {"mean": mean, "n": n}
    std = float(np.std(diffs, ddof=1))
    t = mean / (std / math.sqrt(n)) if std > 0 else math.copysign(math.inf, mean or 1.0)
    out = {"mean": round(mean, 5), "std": round(std, 5), "n": n, "t": round(t, 3)}
    try:
        from scipy import stats
        out["p_two_sided"] = round(float(2 * stats.t.sf(abs(t), n - 1)), 4)
    except ImportError:  # pragma: no cover
        pass
    return out


def bootstrap_diff(labels: np.ndarray, users: np.ndarray, base: np.ndarray,
                   other: np.ndarray, rounds: int, seed: int = 0) -> dict:
    """AUC(other) - AUC(base) over test users resampled with replacement."""
    rng = np.random.default_rng(seed)
    ids = np.unique(users)
    rows = {u: np.flatnonzero(users == u) for u in ids}
    diffs = []
    for _ in range(rounds):
        pick = np.concatenate([rows[u] for u in rng.choice(ids, size=len(ids), replace=True)])
        a, b = auc(labels[pick], other[pick]), auc(labels[pick], base[pick])
        if not (math.isnan(a) or math.isnan(b)):
            diffs.append(a - b)
    diffs = np.asarray(diffs)
    return {"auc_diff": round(auc(labels, other) - auc(labels, base), 5),
            "ci95": [round(float(np.quantile(diffs, 0.025)), 5),
                     round(float(np.quantile(diffs, 0.975)), 5)],
            "share_le_0": round(float(np.mean(diffs <= 0)), 4), "rounds": len(diffs),
            "unit": "test user"}


def fit_seeds(config: dict, catalog, tensors: dict, seeds, *, epochs: int = 15,
              patience: int = 2, log: Callable[[str], object] = lambda m: None
              ) -> tuple[dict, dict]:
    """One model per seed, trained with early stopping on validation AUC and scored on test:
    (AUC and LogLoss mean/std with every run, {seed: test probabilities})."""
    test = tensors["test"]
    labels = test.label.numpy()
    runs, probs = [], {}
    for seed in seeds:
        model = training.build_model(config, catalog, seed)
        fit = training.fit(model, tensors["train"], tensors["val"],
                           TrainConfig(epochs=epochs, patience=patience, seed=seed))
        started = time.perf_counter()
        p = training.predict(model, test)
        scoring_s = time.perf_counter() - started
        probs[seed] = p
        runs.append({"seed": seed, "test_auc": auc(labels, p), "test_logloss": logloss(labels, p),
                     "val_auc": fit.best_val_auc, "best_epoch": fit.best_epoch,
                     "epochs_run": fit.epochs_run, "fit_s": fit.seconds,
                     "scoring_us_per_sample": 1e6 * scoring_s / max(1, test.n)})
        log(f"seed {seed}: test AUC {runs[-1]['test_auc']:.4f} "
            f"logloss {runs[-1]['test_logloss']:.4f} (best epoch {fit.best_epoch})")
    aucs = [r["test_auc"] for r in runs]
    losses = [r["test_logloss"] for r in runs]
    return {
        "auc_mean": round(float(np.mean(aucs)), 5),
        "auc_std": round(float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0, 5),
        "logloss_mean": round(float(np.mean(losses)), 5),
        "logloss_std": round(float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0, 5),
        "runs": [{k_: (round(v, 5) if isinstance(v, float) else v) for k_, v in r.items()}
                 for r in runs]}, probs


def lift(labels: np.ndarray, users: np.ndarray, probs: dict, seeds, base: str, other: str,
         rounds: int) -> dict:
    """`other` against `base` on the same test samples: per-seed paired AUC differences and a
    bootstrap over test users of the seed-averaged predictions."""
    diffs = [auc(labels, probs[other, s]) - auc(labels, probs[base, s]) for s in seeds]
    base_mean = np.mean([probs[base, s] for s in seeds], axis=0)
    other_mean = np.mean([probs[other, s] for s in seeds], axis=0)
    return {"paired_over_seeds": paired(diffs), "per_seed": [round(d, 5) for d in diffs],
            "bootstrap_seed_averaged": bootstrap_diff(labels, users, base_mean, other_mean,
                                                      rounds)}


def run(settings, *, dataset: str = "ml-1m", users: int = 40, depth: int = 2, k: int = 2,
        history_len: int = 50, seeds=(0, 1, 2), backbones=BACKBONES, variants=VARIANTS,
        max_new_tokens: int = 40, batch_size: int = 20, epochs: int = 15, patience: int = 2,
        bootstrap: int = 1000, data_seed: int = 0, examples: int = 2,
        log: Callable[[str], object] = lambda m: None) -> dict:
    started = time.monotonic()
    load_start, uptime_start = load(), uptime()
    sources = tuple(SOURCE_OF[v] for v in variants if v != "base")
    data = training.prepare(settings, dataset=dataset, n_users=users, depth=depth, k=k,
                            history_len=history_len, data_seed=data_seed, sources=sources,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, log=log)
    prepare_s = round(time.monotonic() - started, 1)
    test = data.splits["test"]
    results: dict = {}
    probs: dict = {}
    for backbone in backbones:
        results[backbone] = {}
        for variant in variants:
            source = SOURCE_OF.get(variant)
            tensors = {name: SplitTensors(s, data.lookups[source][name] if source else None,
                                          data.matrices[source] if source else None)
                       for name, s in data.splits.items()}
            config = training.model_config(backbone, data.catalog, interest=source is not None,
                                           k=k)
            results[backbone][variant], variant_probs = fit_seeds(
                config, data.catalog, tensors, seeds, epochs=epochs, patience=patience,
                log=lambda m, b=backbone, v=variant: log(f"{b}/{v} {m}"))
            for seed, p in variant_probs.items():
                probs[backbone, variant, seed] = p
    lifts: dict = {}
    for backbone in backbones:
        lifts[backbone] = {}
        if "base" not in variants:
            break
        by_variant = {(v, s): probs[backbone, v, s] for v in variants for s in seeds}
        for variant in variants:
            if variant != "base":
                lifts[backbone][variant] = lift(test.label, test.user, by_variant, seeds,
                                                "base", variant, bootstrap)
    counts = {
        "users": {name: len(ids) for name, ids in data.users.items()},
        "samples": {name: len(s) for name, s in data.splits.items()},
        "positive_rate": {name: round(float(s.label.mean()), 4) if len(s) else None
                          for name, s in data.splits.items()},
        "partitions_summarised_per_source": sum(len(p) for p in data.partitions.values()),
        "partitions_per_user": depth,
        "summaries": {src: {"ok": sum(x is not None for v in by_user.values() for x in v),
                            "failed": sum(x is None for v in by_user.values() for x in v)}
                      for src, by_user in data.summaries.items()},
        "distinct_texts_encoded": {src: int(m.shape[0] - 1) for src, m in data.matrices.items()},
    }
    out = {
        "dataset": dataset,
        "protocol": {
            "label": "rating > 3",
            "split": "by user (train/val/test 70/15/15), users drawn at random (data_seed) "
                     f"among those with > {depth} closed partitions",
            "samples": f"every rating after the user's partition 0 up to the end of partition "
                       f"{depth}: each sample has 1..{depth} closed partitions behind it",
            "features": f"candidate item id + genres; last {history_len} ratings strictly "
                        "before the sample (item, rating); variants add the UIF user vector",
            "leakage": "history, partitions, summaries and vectors use only ratings with "
                       "ts < the sample's ts (partitions whose last rating is >= ts are unused)",
            "partitions": "streams.ubsp (UBSP) with the settings' close rules "
                          f"(max_events {settings.max_events}, max_gap_s {settings.max_gap_s}, "
                          f"max_span_s {settings.max_span_s}, drift "
                          f"{settings.drift_threshold if data.stats.get('drift') else 'off'})",
            "vectors": f"all-MiniLM-L6-v2 (frozen) over the latest {k} partition summaries and "
                       "the cascaded profile -> attention fusion -> hybrid-expert adaptor "
                       "(2 shared + 2 specific experts) -> 32-d vector into the backbone's MLP "
                       "(DIN) or x0 (DCNv2); trained with the backbone",
            "seeds": list(seeds), "epochs_max": epochs, "early_stopping_patience": patience,
        },
        "summaries_made_by": {
            "code": "models.summaries_batch: llm_workers.prompts cascade_prompt / "
                    "fit_naive_prompt + parse, llm_workers.backends.create(settings)",
            **data.stats.get("summariser", {}), "stats": data.stats.get("summaries", {})},
        "counts": counts,
        "results": results,
        "lift_vs_base": lifts,
        "examples": _examples(data, examples),
        "timing_s": {"prepare_incl_summaries": prepare_s,
                     "total": round(time.monotonic() - started, 1)},
        "machine": machine(load_start, uptime_start),
    }
    out["diagnostics"] = _diagnostics(data)
    out["notes"] = _notes(out)
    return out


def _diagnostics(data) -> dict:
    """How user-specific the texts are: mean cosine between different texts' encoder vectors
    (unit rows), for the cascaded profiles and the partition summaries of each source. Generic
    summaries ("Likes action movies, enjoys drama") sit close together and tell users apart
    poorly, which bounds what any fusion can get from them."""
    out = {}
    for source, matrix in data.matrices.items():
        entry = {}
        for name, column in (("cascaded", 1), ("partition", 0)):
            rows = set()
            for lookup in data.lookups[source].values():
                idx = lookup[column]
                rows.update(int(i) for i in np.unique(idx) if i)
            vectors = matrix[sorted(rows)]
            n = len(vectors)
            if n >= 2:
                sims = vectors @ vectors.T
                entry[f"{name}_mean_cosine"] = round(float((sims.sum() - np.trace(sims)) /
                                                           (n * (n - 1))), 4)
            entry[f"{name}_texts"] = n
        out[source] = entry
    return out


def machine(load_start: dict, uptime_start: str) -> dict:
    """The machine and its load at the start (given) and now: figures are read against it."""
    return {**describe_machine(), "torch_threads": _torch_threads(), "load_at_start": load_start,
            "load_at_end": load(), "uptime_at_start": uptime_start, "uptime_at_end": uptime()}


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def _examples(data, n: int) -> list[dict]:
    out = []
    for user in list(data.partitions)[:n]:
        entry = {"user": user}
        for source, by_user in data.summaries.items():
            if source == "item_text":
                continue
            entry[source] = [None if s is None else {"partition_summary": s.partition_summary,
                                                     "cascaded_summary": s.cascaded_summary}
                             for s in by_user[user]]
        out.append(entry)
    return out


def lift_note(name: str, lift: dict) -> str:
    """One line a person reads: the seed-averaged AUC difference, its CI and the verdict."""
    boot = lift["bootstrap_seed_averaged"]
    low, high = boot["ci95"]
    verdict = ("significant lift" if low > 0 else "significant drop" if high < 0
               else "no significant difference")
    return (f"{name}: AUC diff {boot['auc_diff']:+.4f}, 95% CI over test users "
            f"[{low:+.4f}, {high:+.4f}]: {verdict}")


def _notes(out: dict) -> list[str]:
    notes = []
    for backbone, by_variant in out["lift_vs_base"].items():
        for variant, lift in by_variant.items():
            notes.append(lift_note(f"{backbone} {variant} vs base", lift))
    test_users = out["counts"]["users"]["test"]
    notes.append(f"the test split has {test_users} users and {out['counts']['samples']['test']} "
                 "samples: CIs are wide; more users (--users) need more LLM time")
    return notes
