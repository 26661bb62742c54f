"""`liber bench fusion`: fusion-worker throughput and freshness through a real broker, in one run.

Starts its own local broker, produces `users` x `depth` summaries (synthetic texts from
MovieLens genre names: the LLM is not part of this measurement; `closed_at` = the moment each
summary is sent), then runs the fusion worker in this process until every user's last seq is
published, and reads the vectors back. Also times the interest model alone on the same texts
(its ceiling). Prints one JSON object.
"""
from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

from core import machine
from core.settings import Settings
from ops.local_kafka import LocalKafka, free_port
from streams.producer import BehaviorProducer
from core.records import InterestVector, Summary, decode
from core.topics import SUMMARIES, USER_INTERESTS, create_topics

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western"]


def _texts(rng: random.Random, user: int, seq: int) -> tuple[str, str]:
    a, b, c = rng.sample(GENRES, 3)
    part = f"Watched mostly {a} and {b} films this time, rated {c} titles low."
    profile = f"Long-time fan of {a} with a growing taste for {b}; avoids {c} (user {user}, {seq})."
    return part, profile


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(settings: Settings, *, users: int = 300, depth: int = 3, seed: int = 0,
        log=print) -> dict:
    from fusion.worker import FusionWorker
    from models.artifact import ArtifactError, InterestModel, default_artifact_dir, resolve
    workdir = Path(tempfile.mkdtemp(prefix="liber-bench-fusion-"))
    broker = LocalKafka(settings.home, workdir / "kafka", port=free_port())
    try:
        try:
            artifact = resolve(settings.fusion_model_dir or default_artifact_dir(settings))
            kind = "configured"
        except ArtifactError:
            from models.training import train_tiny_artifact
            log("no trained artifact: training a tiny one (the model's size is what matters)")
            artifact, kind = train_tiny_artifact(settings, workdir / "uif"), "tiny"
        model = InterestModel.load(artifact)
        broker.start(log=lambda m: None)
        settings = settings.replace(bootstrap_servers=broker.bootstrap, topic_partitions=4,
                                    state_dir=str(workdir / "state"), log_level="WARNING",
                                    fusion_model_dir=str(artifact))
        create_topics(settings, log=lambda m: None)
        rng = random.Random(seed)
        summaries = [(u, s, *_texts(rng, u, s)) for s in range(depth) for u in range(users)]
        sent_at: dict[tuple[str, int], float] = {}
        with BehaviorProducer(settings) as producer:
            for u, s, part, profile in summaries:
                sent_at[f"u{u}", s] = now = time.time()
                record = Summary(f"u{u}", s, part, "", profile, 0, 0, "synthetic", "none", 0.0,
                                 end_ts=1e9 + s, closed_at=now)
                producer.send_raw(SUMMARIES, record.user_id.encode(), record.encode())
        log(f"{len(summaries)} summaries of {users} users sent")
        model.user_vectors([(["warm-up"], "warm-up")])  # load the text encoder first
        worker = FusionWorker(settings, model)
        try:
            started = time.perf_counter()
            done = 0
            while done < users:
                worker.step(poll_ms=200)
                done = sum(1 for u in range(users)
                           if (worker.store.user(f"u{u}") or {}).get("version") == depth - 1)
            seconds = time.perf_counter() - started
        finally:
            worker.shutdown()
        vectors = _read_vectors(settings)
        freshness = [v.produced_at - sent_at[(v.user_id, v.version)] for v in vectors]
        # the model alone, same batch size, on every user's final inputs
        finals: dict[int, list] = {}
        for u, s, part, profile in summaries:
            finals.setdefault(u, [[], ""])
            finals[u] = [[part] + finals[u][0], profile]
        inputs = [(parts[:model.k], profile) for parts, profile in finals.values()]
        batch = settings.fusion_batch_size
        t0 = time.perf_counter()
        for i in range(0, len(inputs), batch):
            model.user_vectors(inputs[i:i + batch])
        model_seconds = time.perf_counter() - t0
        return {
            "benchmark": "fusion", "machine": machine.describe(),
            "artifact": {"kind": kind, "path": str(artifact), "version": model.version,
                         "dim": model.dim, "k": model.k},
            "users": users, "depth": depth, "summaries": len(summaries),
            "batch_size": batch, "seconds": round(seconds, 2),
            "summaries_per_s": round(len(summaries) / seconds, 1),
            "vectors_published": len(vectors),
            "freshness_s": {"p50": round(_percentile(freshness, 0.5), 2),
                            "p95": round(_percentile(freshness, 0.95), 2),
                            "max": round(max(freshness), 2) if freshness else None,
                            "note": "whole backlog sent before the worker starts: freshness "
                                    "includes the queueing of the backlog"},
            "model_only": {"users_per_s": round(len(inputs) / model_seconds, 1),
                           "seconds": round(model_seconds, 2)},
        }
    finally:
        broker.stop(log=lambda m: None)
        shutil.rmtree(workdir, ignore_errors=True)


def _read_vectors(settings: Settings) -> list[InterestVector]:
    from core.kafka import iter_to_end
    return [decode(InterestVector, r.value, key=r.key)
            for r in iter_to_end(settings, settings.topic(USER_INTERESTS), timeout=None,
                                 max_records=500)]
