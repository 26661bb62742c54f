"""`liber eval-dare`: does DARE's relaxed verification change what the ranker sees, and its AUC?

The same users, partitions and CTR samples are summarised twice by the batch UIL path
(models.summaries_batch, the worker's prompts and backend):

    reference  plain greedy decoding, which DARE strict equals token for token
               (tests/llm_workers/backends/test_transformers_dare.py); cached. `reference`
               settings (e.g. {"llm_repetition_penalty": "1.15"}) make it differ from the
               candidate: to compare with an earlier decoding of the worker.
    candidate  DARE `relaxed` (default; top-k and probability floor of the settings) or
               `strict`, with pools and a summary cache of their own, new for each run: the
               pools are warmed only by this run's answers, in order. (Pools holding the
               reference answers to the same prompts would draft those answers back and make
               relaxed look like the reference.)

Then, per backbone and seed, two views of the AUC difference (candidate - reference) on the
test users:

    swapped    one ranker trained on reference summaries, its test users scored once with their
               reference and once with their candidate vectors: turning the candidate decoding
               on under a deployed ranker. No retraining between the two sides: only the
               vectors change.
    retrained  a second ranker trained and tested on candidate summaries, against the first
               (what `liber eval` compares): includes the seed-to-seed training noise.

Both come with paired statistics over the seeds and a bootstrap over test users.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from llm_workers import backends
from models import evaluation, training
from models.summaries_batch import BatchSummariser, SummaryCache
from models.ctr_metrics import auc
from models.prepare import Prepared
from models.split_tensors import SplitTensors
from models.training import TrainConfig

SOURCE = "cascade"


def candidate_settings(settings, pool_dir: str, mode: str = "relaxed"):
    return settings.replace(llm_dare=1, dare_mode=mode, dare_pool_dir=pool_dir)


def _tensors(data: Prepared, split: str, source: str) -> SplitTensors:
    return SplitTensors(data.splits[split], data.lookups[source][split], data.matrices[source])


def compare(reference: Prepared, candidate: Prepared, *, backbones=evaluation.BACKBONES,
            seeds=(0, 1, 2), epochs: int = 15, patience: int = 2, bootstrap: int = 1000,
            source: str = SOURCE, log: Callable[[str], object] = lambda m: None) -> dict:
    """AUC of reference-trained rankers on reference vs candidate test vectors (swapped), and
    of candidate-trained rankers (retrained). Both must hold the same users and samples."""
    if reference.users != candidate.users or \
            len(reference.splits["test"]) != len(candidate.splits["test"]):
        raise ValueError("reference and candidate data must come from the same users and samples")
    test = reference.splits["test"]
    out = {}
    for backbone in backbones:
        config = training.model_config(backbone, reference.catalog, interest=True, k=reference.k)
        probs = {"reference": [], "swapped": [], "retrained": []}
        for seed in seeds:
            cfg = TrainConfig(epochs=epochs, patience=patience, seed=seed)
            for name, data in (("reference", reference), ("retrained", candidate)):
                model = training.build_model(config, reference.catalog, seed)
                training.fit(model, _tensors(data, "train", source), _tensors(data, "val", source),
                             cfg)
                probs[name].append(training.predict(model, _tensors(data, "test", source)))
                if name == "reference":
                    probs["swapped"].append(
                        training.predict(model, _tensors(candidate, "test", source)))
            log(f"{backbone} seed {seed}: AUC reference "
                f"{auc(test.label, probs['reference'][-1]):.4f}, "
                f"swapped {auc(test.label, probs['swapped'][-1]):.4f}, "
                f"retrained {auc(test.label, probs['retrained'][-1]):.4f}")
        reference_aucs = [auc(test.label, p) for p in probs["reference"]]
        result = {"auc_reference": round(float(np.mean(reference_aucs)), 5)}
        for view in ("swapped", "retrained"):
            aucs = [auc(test.label, p) for p in probs[view]]
            result[view] = {
                "auc_candidate": round(float(np.mean(aucs)), 5),
                "auc_diff_per_seed": [round(a - b, 5) for a, b in zip(aucs, reference_aucs)],
                "paired_over_seeds": evaluation.paired(
                    [a - b for a, b in zip(aucs, reference_aucs)]),
                "bootstrap_seed_averaged": evaluation.bootstrap_diff(
                    test.label, test.user, np.mean(probs["reference"], axis=0),
                    np.mean(probs[view], axis=0), bootstrap)}
        out[backbone] = result
    return out


def summary_agreement(reference: Prepared, candidate: Prepared) -> dict:
    """How many summaries the candidate decoding left exactly as the reference wrote them."""
    pairs = [(a, b) for u in reference.summaries[SOURCE]
             for a, b in zip(reference.summaries[SOURCE][u], candidate.summaries[SOURCE][u])
             if a is not None and b is not None]
    same = [(a.partition_summary, a.cascaded_summary) == (b.partition_summary, b.cascaded_summary)
            for a, b in pairs]
    return {"summaries": len(pairs), "identical": int(sum(same)),
            "identical_share": round(float(np.mean(same)), 4) if pairs else None}


def run(settings, *, dataset: str = "ml-1m", users: int = 100, depth: int = 2, k: int = 2,
        history_len: int = 50, seeds=(0, 1, 2), backbones=evaluation.BACKBONES,
        max_new_tokens: int = 40, batch_size: int = 20, epochs: int = 15, patience: int = 2,
        bootstrap: int = 1000, data_seed: int = 0, candidate: str = "relaxed",
        reference: dict[str, str] | None = None,
        log: Callable[[str], object] = lambda m: None) -> dict:
    if candidate not in ("strict", "relaxed"):
        raise ValueError(f"candidate must be strict or relaxed, not {candidate!r}")
    if settings.llm_backend == "auto":  # llm_dare is the transformers backend's DARE
        settings = settings.replace(llm_backend="transformers")
    settings = backends.resolve(settings)
    started = time.monotonic()
    load_start, uptime_start = evaluation.load(), evaluation.uptime()
    common = dict(dataset=dataset, n_users=users, depth=depth, k=k, history_len=history_len,
                  data_seed=data_seed, sources=(SOURCE,), max_new_tokens=max_new_tokens,
                  batch_size=batch_size, log=log)
    changes = dict(reference or {})
    shown = "".join(f", {name}={value}" for name, value in changes.items())
    log(f"summaries, reference (plain greedy{shown})")
    base = training.prepare(settings.replace_text(changes).replace(llm_dare=0), **common)
    log(f"summaries, candidate: DARE {candidate} (new pools, new cache)")
    with tempfile.TemporaryDirectory(prefix="liber-eval-dare-") as work:
        s = candidate_settings(settings, str(Path(work) / "pools"), candidate)
        summariser = BatchSummariser(s, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     cache=SummaryCache(Path(work) / "uil.sqlite"), log=log)
        try:
            made = training.prepare(s, summariser=summariser, **common)
        finally:
            summariser.close()
    prepare_s = round(time.monotonic() - started, 1)
    rule = (f"top_k {settings.dare_top_k}, min_prob {settings.dare_min_prob}, "
            if candidate == "relaxed" else "")
    return {
        "dataset": dataset,
        "protocol": {
            "summaries": f"{SOURCE} (batch UIL, the worker's prompts and backend), "
                         f"{depth} partitions per user, max_new_tokens {max_new_tokens}, "
                         f"repetition penalty {settings.llm_repetition_penalty}, "
                         f"dtype {settings.llm_dtype}",
            "reference": f"plain greedy (DARE strict is token-identical to it){shown}",
            "candidate": f"DARE {candidate}: {rule}draft_len {settings.dare_draft_len}; new "
                         "pools warmed only by this run's own answers, no cached answers",
            "swapped": "rankers trained on reference summaries; test users scored with "
                       "reference and with candidate vectors (the same ranker on both sides)",
            "retrained": "rankers trained and tested on candidate summaries against the "
                         "reference ones (includes training noise)",
            "split": "by user 70/15/15 as in `liber eval`", "seeds": list(seeds),
            "epochs_max": epochs, "early_stopping_patience": patience},
        "counts": {"users": {n: len(ids) for n, ids in base.users.items()},
                   "test_samples": len(base.splits["test"])},
        "summaries": {"agreement": summary_agreement(base, made),
                      "reference": base.stats.get("summaries", {}).get(SOURCE),
                      "candidate": made.stats.get("summaries", {}).get(SOURCE),
                      "made_by": made.stats.get("summariser", {})},
        "results": compare(base, made, backbones=backbones, seeds=seeds, epochs=epochs,
                           patience=patience, bootstrap=bootstrap, log=log),
        "goal": "candidate within 0.001 AUC of the reference",
        "timing_s": {"prepare_incl_summaries": prepare_s,
                     "total": round(time.monotonic() - started, 1)},
        "machine": evaluation.machine(load_start, uptime_start),
    }
