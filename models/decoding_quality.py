"""`liber eval-dare`: does DARE's relaxed verification change what the ranker sees, and its AUC?

The same users, partitions and CTR samples are summarised twice by the batch UIL path
(models.summaries_batch, the worker's prompts and backend):

    strict     plain greedy decoding, which DARE strict equals token for token
               (tests/llm_workers/test_backends_dare.py); cached as usual.
    relaxed    DARE relaxed (top-k and probability floor of the settings) with pools and a
               summary cache of their own, new for each run: the pools are warmed only by this
               run's relaxed answers, in order. (Pools holding the strict answers to the same
               prompts would draft those answers back and make relaxed look like strict.)

Then, per backbone and seed, two views of the AUC difference on the test users:

    swapped    one ranker trained on strict summaries, its test users scored once with their
               strict and once with their relaxed vectors: turning relaxed DARE on under a
               deployed ranker. No retraining between the two sides: only the vectors change.
    retrained  a second ranker trained and tested on relaxed summaries, against the first (what
               `liber eval` compares): includes the seed-to-seed training noise.

Both come with paired statistics over the seeds and a bootstrap over test users.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from models import evaluation, training
from models.summaries_batch import BatchSummariser, SummaryCache
from models.training import Prepared, SplitTensors, TrainConfig, auc

SOURCE = "cascade"


def relaxed_settings(settings, pool_dir: str):
    return dataclasses.replace(settings, llm_dare=1, dare_mode="relaxed", dare_pool_dir=pool_dir)


def _tensors(data: Prepared, split: str, source: str) -> SplitTensors:
    return SplitTensors(data.splits[split], data.lookups[source][split], data.matrices[source])


def compare(strict: Prepared, relaxed: Prepared, *, backbones=evaluation.BACKBONES,
            seeds=(0, 1, 2), epochs: int = 15, patience: int = 2, bootstrap: int = 1000,
            source: str = SOURCE, log: Callable[[str], object] = lambda m: None) -> dict:
    """AUC of strict-trained rankers on strict vs relaxed test vectors (swapped), and of
    relaxed-trained rankers (retrained). Both Prepared must hold the same users and samples."""
    if strict.users != relaxed.users or len(strict.splits["test"]) != len(relaxed.splits["test"]):
        raise ValueError("strict and relaxed data must come from the same users and samples")
    test = strict.splits["test"]
    out = {}
    for backbone in backbones:
        config = training.model_config(backbone, strict.catalog, interest=True, k=strict.k)
        probs = {"strict": [], "swapped": [], "retrained": []}
        for seed in seeds:
            cfg = TrainConfig(epochs=epochs, patience=patience, seed=seed)
            for name, data in (("strict", strict), ("retrained", relaxed)):
                model = training.build_model(config, strict.catalog, seed)
                training.fit(model, _tensors(data, "train", source), _tensors(data, "val", source),
                             cfg)
                probs[name].append(training.predict(model, _tensors(data, "test", source)))
                if name == "strict":
                    probs["swapped"].append(
                        training.predict(model, _tensors(relaxed, "test", source)))
            log(f"{backbone} seed {seed}: AUC strict {auc(test.label, probs['strict'][-1]):.4f}, "
                f"swapped {auc(test.label, probs['swapped'][-1]):.4f}, "
                f"retrained {auc(test.label, probs['retrained'][-1]):.4f}")
        strict_aucs = [auc(test.label, p) for p in probs["strict"]]
        result = {"auc_strict": round(float(np.mean(strict_aucs)), 5)}
        for view in ("swapped", "retrained"):
            aucs = [auc(test.label, p) for p in probs[view]]
            result[view] = {
                "auc_relaxed": round(float(np.mean(aucs)), 5),
                "auc_diff_per_seed": [round(a - b, 5) for a, b in zip(aucs, strict_aucs)],
                "paired_over_seeds": evaluation.paired([a - b for a, b in zip(aucs, strict_aucs)]),
                "bootstrap_seed_averaged": evaluation.bootstrap_diff(
                    test.label, test.user, np.mean(probs["strict"], axis=0),
                    np.mean(probs[view], axis=0), bootstrap)}
        out[backbone] = result
    return out


def summary_agreement(strict: Prepared, relaxed: Prepared) -> dict:
    """How many summaries relaxed decoding left exactly as strict wrote them."""
    pairs = [(a, b) for u in strict.summaries[SOURCE]
             for a, b in zip(strict.summaries[SOURCE][u], relaxed.summaries[SOURCE][u])
             if a is not None and b is not None]
    same = [(a.partition_summary, a.cascaded_summary) == (b.partition_summary, b.cascaded_summary)
            for a, b in pairs]
    return {"summaries": len(pairs), "identical": int(sum(same)),
            "identical_share": round(float(np.mean(same)), 4) if pairs else None}


def run(settings, *, dataset: str = "ml-1m", users: int = 100, depth: int = 2, k: int = 2,
        history_len: int = 50, seeds=(0, 1, 2), backbones=evaluation.BACKBONES,
        max_new_tokens: int = 40, batch_size: int = 20, epochs: int = 15, patience: int = 2,
        bootstrap: int = 1000, data_seed: int = 0,
        log: Callable[[str], object] = lambda m: None) -> dict:
    started = time.monotonic()
    load_start, uptime_start = evaluation.load(), evaluation.uptime()
    common = dict(dataset=dataset, n_users=users, depth=depth, k=k, history_len=history_len,
                  data_seed=data_seed, sources=(SOURCE,), max_new_tokens=max_new_tokens,
                  batch_size=batch_size, log=log)
    log("summaries, strict (plain greedy)")
    strict = training.prepare(dataclasses.replace(settings, llm_dare=0), **common)
    log("summaries, DARE relaxed (new pools, new cache)")
    with tempfile.TemporaryDirectory(prefix="liber-eval-dare-") as work:
        s = relaxed_settings(settings, str(Path(work) / "pools"))
        summariser = BatchSummariser(s, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     cache=SummaryCache(Path(work) / "uil.sqlite"), log=log)
        try:
            relaxed = training.prepare(s, summariser=summariser, **common)
        finally:
            summariser.close()
    prepare_s = round(time.monotonic() - started, 1)
    return {
        "dataset": dataset,
        "protocol": {
            "summaries": f"{SOURCE} (batch UIL, the worker's prompts and backend), "
                         f"{depth} partitions per user, max_new_tokens {max_new_tokens}",
            "strict": "plain greedy (DARE strict is token-identical to it)",
            "relaxed": f"DARE relaxed: top_k {settings.dare_top_k}, min_prob "
                       f"{settings.dare_min_prob}, draft_len {settings.dare_draft_len}; new "
                       "pools warmed only by this run's relaxed answers, no cached answers",
            "swapped": "rankers trained on strict summaries; test users scored with strict and "
                       "with relaxed vectors (the same ranker on both sides)",
            "retrained": "rankers trained and tested on relaxed summaries against the strict "
                         "ones (includes training noise)",
            "split": "by user 70/15/15 as in `liber eval`", "seeds": list(seeds),
            "epochs_max": epochs, "early_stopping_patience": patience},
        "counts": {"users": {n: len(ids) for n, ids in strict.users.items()},
                   "test_samples": len(strict.splits["test"])},
        "summaries": {"agreement": summary_agreement(strict, relaxed),
                      "strict": strict.stats.get("summaries", {}).get(SOURCE),
                      "relaxed": relaxed.stats.get("summaries", {}).get(SOURCE),
                      "made_by": relaxed.stats.get("summariser", {})},
        "results": compare(strict, relaxed, backbones=backbones, seeds=seeds, epochs=epochs,
                           patience=patience, bootstrap=bootstrap, log=log),
        "goal": "relaxed within 0.001 AUC of strict",
        "timing_s": {"prepare_incl_summaries": prepare_s,
                     "total": round(time.monotonic() - started, 1)},
        "machine": evaluation.machine(load_start, uptime_start),
    }
