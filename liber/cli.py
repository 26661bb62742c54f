"""`liber`: the command line of LIBER-Stream. Every command reads the same Settings."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from core.settings import Settings, SettingsError


def _broker(settings: Settings, args):
    from ops.local_kafka import LocalKafka
    data_dir = Path(args.data_dir or Path(settings.home) / "broker")
    port = args.port or int(settings.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    return LocalKafka(settings.home, data_dir, port=port, detached=True)  # outlives the command


def cmd_kafka(settings: Settings, args) -> int:
    if args.action == "fetch":
        from ops.local_kafka import fetch_jars
        fetch_jars(settings.home)
        return 0
    broker = _broker(settings, args)
    if args.action == "start":
        broker.start()
        print(f"bootstrap servers: {broker.bootstrap}")
    elif args.action == "stop":
        broker.stop()
    else:
        up = broker.running() and broker.healthy()
        print(f"kafka on {broker.bootstrap}: {'running, pid ' + str(broker.pid()) if up else 'not running'}")
        return 0 if up else 1
    return 0


def cmd_topics(settings: Settings, args) -> int:
    from core.topics import create_topics
    created = create_topics(settings)
    print(f"{len(created)} topics created, the others existed")
    return 0


def cmd_data(settings: Settings, args) -> int:
    from streams import movielens
    paths = movielens.fetch(settings.home, datasets=tuple(args.dataset or movielens.DATASETS))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_produce(settings: Settings, args) -> int:
    from streams.replay import replay
    from core.topics import create_topics
    create_topics(settings, log=lambda m: None)
    result = replay(settings, args.dataset, rate=args.rate, limit=args.limit, users=args.users,
                    per_user=args.per_user, items=not args.no_items, progress=not args.quiet)
    print(json.dumps(result.__dict__))
    return 0


def cmd_worker(settings: Settings, args) -> int:
    from core import logs
    from core.topics import create_topics
    logs.setup(settings.log_level)  # one JSON line per event (core/logs.py)
    from core.kafka import until_reachable
    from streams.worker import run
    until_reachable("topics", lambda: create_topics(settings, log=logging.getLogger("liber").info))
    run(settings)
    return 0


def cmd_demo(settings: Settings, args) -> int:
    from liber.demo import run_demo
    return run_demo(settings, dataset=args.dataset, users=args.users or None,
                    per_user=args.per_user or None, show=args.show)


def cmd_models(settings: Settings, args) -> int:
    from llm_workers import model_store
    print(f"{model_store.DEFAULT_MODEL}: {model_store.model_dir(settings.home)}")
    return 0


def bench_stream(settings: Settings, args) -> dict:
    from benchmarks.bench_stream import run
    return run(settings, dataset=args.dataset or "ml-1m", limit=args.limit,
               log=lambda m: print(m, file=sys.stderr))


def bench_dare(settings: Settings, args) -> dict:
    from benchmarks.bench_dare import run
    return run(args, settings)


def bench_llm_cost(settings: Settings, args) -> dict:
    from benchmarks.bench_cost import run
    return run(settings, dataset=args.dataset or "ml-1m", users=args.users,
               gen_sample_users=args.gen_sample_users, gen_sample_depth=args.gen_sample_depth,
               naive_sample=args.naive_sample, log=lambda m: print(m, file=sys.stderr))


# Benchmark name -> function(settings, args) returning the JSON-able result.
def bench_fusion(settings: Settings, args) -> dict:
    from benchmarks.bench_fusion import run
    return run(settings, users=args.users, log=lambda m: print(m, file=sys.stderr))


def bench_llm(settings: Settings, args) -> dict:
    from benchmarks.bench_llm import run
    return run(settings, users=args.llm_users, depth=args.llm_depth,
               only=args.only.split(",") if args.only else None,
               log=lambda m: print(m, file=sys.stderr))


def bench_summaries(settings: Settings, args) -> dict:
    from benchmarks.bench_summaries import run
    return run(settings, users=args.llm_users, depth=args.llm_depth, fastest=args.fastest,
               log=lambda m: print(m, file=sys.stderr))


BENCHMARKS = {"stream": bench_stream, "dare": bench_dare, "llm-cost": bench_llm_cost,
              "fusion": bench_fusion, "llm": bench_llm, "summaries": bench_summaries}


def cmd_bench(settings: Settings, args) -> int:
    result = BENCHMARKS[args.benchmark](settings, args)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def cmd_llm_worker(settings: Settings, args) -> int:
    from core import logs
    from llm_workers.backends import BackendError
    logs.setup(settings.log_level)
    from llm_workers.service import run
    try:
        run(settings)
    except BackendError as exc:
        print(f"liber: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_fusion_worker(settings: Settings, args) -> int:
    from core import logs
    logs.setup(settings.log_level)
    from fusion.worker import run
    from models.artifact import ArtifactError
    try:
        run(settings)
    except ArtifactError as exc:  # no trained interest model yet
        print(f"liber: {exc} (or set LIBER_FUSION_MODEL_DIR)", file=sys.stderr)
        return 2
    return 0


def cmd_backfill(settings: Settings, args) -> int:
    from streams import backfill
    if args.from_dataset:
        rows = backfill.write_parquet(args.from_dataset, args.path, args.until, home=settings.home,
                                      users=args.users)
        print(f"{args.path}: {rows} events of {args.from_dataset}"
              f"{f' with ts <= {args.until}' if args.until is not None else ''}", file=sys.stderr)
        if args.write_only:
            return 0
    try:
        result = backfill.run(settings, args.path, force=args.force, items=not args.no_items,
                              log_fn=lambda m: print(m, file=sys.stderr))
    except backfill.BackfillRefused as exc:
        print(f"liber backfill: {exc}", file=sys.stderr)
        return 3
    print(backfill.result_json(result))
    return 0


def cmd_chaos(settings: Settings, args) -> int:
    from liber import chaos
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    if args.soak:
        result = chaos.soak(settings, args.soak, args.rate, users=args.soak_users,
                            with_llm=args.with_llm,
                            workdir=args.workdir, log=log)
        ok = result["invariants_ok"] and result["drained"]
    else:
        known = chaos.CLUSTER_FAULTS if args.cluster else chaos.FAULTS
        wrong = sorted(set(args.fault or ()) - set(known))
        if wrong:
            print(f"liber chaos: {', '.join(wrong)}: not a fault of "
                  f"{'a cluster' if args.cluster else 'one broker'}; known: {', '.join(known)}",
                  file=sys.stderr)
            return 2
        result = chaos.run(settings, args.fault or known, users=args.users,
                           per_user=args.per_user, replay_s=args.replay_s,
                           workdir=args.workdir, cluster=args.cluster, log=log)
        ok = result["ok"]
    print(json.dumps(result, indent=None if args.json else 2, default=str))
    return 0 if ok else 1


def cmd_train(settings: Settings, args) -> int:
    from models.training import TrainConfig, train_artifact
    path = train_artifact(settings, args.out, dataset=args.dataset, n_users=args.users,
                          depth=args.depth, k=args.k, source=args.source, backbone=args.backbone,
                          cfg=TrainConfig(epochs=args.epochs), max_new_tokens=args.max_new_tokens,
                          batch_size=args.llm_batch, log=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


def cmd_eval(settings: Settings, args) -> int:
    if args.protocol == "shallow":
        from models.evaluation import VARIANTS, run
        variants = args.variants or "base,liber,naive,item_text"
    else:
        from models.lifelong_eval import DEFAULT_VARIANTS, VARIANTS
        variants = args.variants or ",".join(DEFAULT_VARIANTS)
    unknown = set(variants.split(",")) - set(VARIANTS)
    if unknown:
        print(f"liber eval: unknown variants {sorted(unknown)}; known for the {args.protocol} "
              f"protocol: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.protocol == "shallow":
        result = run(settings, dataset=args.dataset, users=args.users, depth=args.depth,
                     k=args.k, seeds=tuple(range(args.seeds)),
                     max_new_tokens=args.max_new_tokens, batch_size=args.llm_batch,
                     epochs=args.epochs, variants=tuple(variants.split(",")), log=log)
    else:
        from llm_workers.backends import fastest, resolve
        from models.lifelong_data import LifelongConfig
        from models.lifelong_eval import run as run_lifelong
        settings = fastest(settings) if args.llm == "fastest" else resolve(settings)
        log(f"summaries by {settings.llm_backend} ({settings.llm_dtype}, "
            f"template {settings.llm_template})")
        cfg = LifelongConfig(min_ratings=args.min_ratings, max_history=args.max_history,
                             sample_share=args.sample_share, window=args.window,
                             long_window=args.long_window)
        result = run_lifelong(settings, users=args.users, cfg=cfg, k=args.k,
                              seeds=tuple(range(args.seeds)), variants=tuple(variants.split(",")),
                              max_new_tokens=args.max_new_tokens, batch_size=args.llm_batch,
                              epochs=args.epochs, log=log)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def cmd_eval_dare(settings: Settings, args) -> int:
    from models.decoding_quality import run
    try:
        reference = dict(_name_value(v) for v in args.reference or ())
        settings.replace_text(reference)            # refused before any work
    except SettingsError as exc:
        print(f"liber: invalid setting: {exc}", file=sys.stderr)
        return 2
    result = run(settings, dataset=args.dataset, users=args.users, depth=args.depth, k=args.k,
                 seeds=tuple(range(args.seeds)), max_new_tokens=args.max_new_tokens,
                 batch_size=args.llm_batch, epochs=args.epochs, candidate=args.candidate,
                 reference=reference, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise SettingsError(f"--reference {text!r}: must be NAME=VALUE")
    return name.strip(), value.strip()


def cmd_status(settings: Settings, args) -> int:
    from liber.status import run
    print(run(settings, urls=args.metrics, window_s=args.window, closes=args.closes,
              kafka=not args.no_kafka))
    return 0


def cmd_check_kafka(settings: Settings, args) -> int:
    from liber.kafka_check import KafkaCheckError, check
    try:
        print(json.dumps(check(settings)))
    except KafkaCheckError as exc:
        print(f"liber: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_config(settings: Settings, args) -> int:
    print(json.dumps(settings.summary(), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liber", description=__doc__)
    parser.add_argument("--config", help="TOML settings file (also LIBER_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("kafka", help="start, stop or check the local single-node Kafka broker")
    p.add_argument("action", choices=["fetch", "start", "stop", "status"])
    p.add_argument("--data-dir", help="broker data directory (default HOME/broker)")
    p.add_argument("--port", type=int, help="listener port (default: from bootstrap_servers)")
    p.set_defaults(func=cmd_kafka)

    p = sub.add_parser("topics", help="create LIBER-Stream's topics (and DLQs) if missing")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("data", help="datasets")
    p.add_argument("action", choices=["fetch"])
    p.add_argument("--dataset", action="append", choices=["ml-100k", "ml-1m"])
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("produce", help="replay a MovieLens dataset into `items` and `behaviors`")
    p.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m"])
    p.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    p.add_argument("--limit", type=int, help="send only the first N events")
    p.add_argument("--users", type=int, help="only the first N users to appear")
    p.add_argument("--per-user", type=int, help="at most the first N events of each user")
    p.add_argument("--no-items", action="store_true", help="skip the item catalogue")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("worker", help="run the stream worker (UBSP agent, RocksDB state)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("demo", help="local broker, stream and LLM workers, MovieLens replay, results")
    p.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m"])
    p.add_argument("--users", type=int, default=5,
                   help="replay the first N users (0: all; the LLM summarises every partition)")
    p.add_argument("--per-user", type=int, default=40,
                   help="each user's first N events (0: all), so the CPU LLM finishes in minutes")
    p.add_argument("--show", type=int, default=3, help="users to print")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="prepare the bundled models (SmolLM2 float copy)")
    p.add_argument("action", choices=["fetch"])
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="benchmarks; each prints one JSON object")
    p.add_argument("benchmark", choices=sorted(BENCHMARKS))
    p.add_argument("--dataset", choices=["ml-100k", "ml-1m"])
    p.add_argument("--limit", type=int, help="only the first N events")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    from benchmarks.bench_dare import add_arguments as dare_arguments  # stdlib-only import
    dare_arguments(p.add_argument_group("dare (retrieval-pool speculative decoding)"))
    g = p.add_argument_group("llm-cost (cascade vs naive token cost)")
    g.add_argument("--users", type=int, default=1000,
                   help="first N users of the dataset (fusion: synthetic users, 3 summaries each)")
    g.add_argument("--gen-sample-users", type=int, default=4,
                   help="users whose first partitions are really generated (cascade sample)")
    g.add_argument("--gen-sample-depth", type=int, default=3,
                   help="partitions generated per sampled user, in cascade order")
    g.add_argument("--naive-sample", type=int, default=3, help="naive prompts really generated")
    g = p.add_argument_group("llm, summaries (the LLM stage's configurations; summary quality)")
    g.add_argument("--llm-users", type=int, default=16, help="MovieLens-1M users summarised")
    g.add_argument("--llm-depth", type=int, default=2, help="partitions per user, in cascade "
                                                            "order")
    g.add_argument("--only", help="llm: comma-separated configurations (default all)")
    g.add_argument("--fastest", action="store_true",
                   help="summaries: the fastest backend here instead of the settings' own")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("llm-worker", help="run the LLM worker (UIL: partitions.closed -> summaries)")
    p.set_defaults(func=cmd_llm_worker)

    p = sub.add_parser("fusion-worker", help="run the fusion worker (UIF: summaries -> "
                                              "user-interests vectors)")
    p.set_defaults(func=cmd_fusion_worker)

    p = sub.add_parser("backfill", help="load lifelong histories from Parquet into UBSP state and "
                                         "partitions.closed, without a Kafka round trip per event")
    p.add_argument("path", help="Parquet file: event_id, user_id, item_id, action, ts, value")
    p.add_argument("--force", action="store_true",
                   help="run even if the worker group has committed offsets or live members")
    p.add_argument("--no-items", action="store_true", help="do not read item text from `items`")
    p.add_argument("--from-dataset", choices=["ml-100k", "ml-1m"],
                   help="first write PATH from this MovieLens dataset")
    p.add_argument("--until", type=float, help="with --from-dataset: only events with ts <= UNTIL")
    p.add_argument("--users", type=int, help="with --from-dataset: only the first N users")
    p.add_argument("--write-only", action="store_true", help="with --from-dataset: only write PATH")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("chaos", help="inject faults during a MovieLens replay and check invariants "
                                      "(or --soak: a load run); prints one JSON object")
    p.add_argument("--fault", action="append", choices=["kill_stream_worker", "kill_llm_worker",
                                                        "broker_restart", "llm_errors", "slow_llm",
                                                        "broker_kill", "controller_kill",
                                                        "rolling_restart",
                                                        "stream_worker_kill_broker_down"],
                   help="run only this fault (repeatable; default: all, one at a time; the last "
                        "four need --cluster)")
    p.add_argument("--cluster", type=int, default=0, metavar="N",
                   help="run on an N-node KRaft cluster (replication N, min.insync.replicas 2) "
                        "with the cluster's faults")
    p.add_argument("--users", type=int, default=10, help="first N MovieLens-100K users")
    p.add_argument("--per-user", type=int, default=50, help="first N events of each user")
    p.add_argument("--replay-s", type=float, default=20.0, help="spread the replay over N seconds")
    p.add_argument("--soak", type=float, metavar="SECONDS", help="load run of this length instead")
    p.add_argument("--rate", type=float, default=500.0, help="soak: events per second (ML-1M)")
    p.add_argument("--with-llm", action="store_true", help="soak: run the LLM worker too")
    p.add_argument("--soak-users", type=int, metavar="N",
                   help="soak: a fixed population, the first N users' ratings in laps "
                        "(default: ML-1M in time order, new users keep arriving)")
    p.add_argument("--workdir", help="broker data, state and logs (default: a new temp dir)")
    p.add_argument("--json", action="store_true", help="one line of JSON (progress to stderr)")
    p.set_defaults(func=cmd_chaos)

    for name, helptext in (("train", "train UIF + a CTR model on MovieLens, save a versioned "
                                     "artifact (models/artifact.py)"),
                           ("eval", "CTR evaluation: backbones alone vs with UIF vectors "
                                    "(models/evaluation.py)"),
                           ("eval-dare", "CTR AUC with plain vs DARE summaries "
                                         "(models/decoding_quality.py)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--dataset", default="ml-1m", choices=["ml-100k", "ml-1m"])
        p.add_argument("--users", type=int, default=300 if name == "eval" else 40,
                       help="users drawn (split 70/15/15)")
        p.add_argument("--depth", type=int, default=2, help="partitions summarised per user")
        p.add_argument("--k", type=int, default=2, help="latest partition summaries fused")
        p.add_argument("--epochs", type=int, default=15, help="most epochs (early stopping)")
        p.add_argument("--max-new-tokens", type=int, default=64 if name == "eval" else 40,
                       help="LLM answer cap")
        p.add_argument("--llm-batch", type=int, default=64 if name == "eval" else 20,
                       help="prompts per LLM call")
        if name == "train":
            p.add_argument("--source", default="cascade", choices=["cascade", "naive", "item_text"])
            p.add_argument("--backbone", default="din", choices=["din", "dcnv2"])
            p.add_argument("--out", help="artifact root (default HOME/models/uif)")
            p.set_defaults(func=cmd_train)
        else:
            p.add_argument("--seeds", type=int, default=3, help="seeds per model")
            p.add_argument("--json", action="store_true", help="one line of JSON")
        if name == "eval-dare":
            p.add_argument("--candidate", default="relaxed", choices=["relaxed", "strict"],
                           help="DARE verification of the candidate side")
            p.add_argument("--reference", action="append", metavar="NAME=VALUE",
                           help="a setting of the reference side only, e.g. "
                                "llm_repetition_penalty=1.15 (repeatable)")
            p.set_defaults(func=cmd_eval_dare)
        elif name == "eval":
            p.add_argument("--protocol", default="lifelong", choices=["lifelong", "shallow"],
                           help="lifelong (default): long histories, late samples, a short "
                                "ranker window (models/lifelong_eval.py); shallow: the earlier "
                                "protocol (--depth partitions, 50-rating history)")
            p.add_argument("--variants", help="comma-separated (lifelong default: "
                                              "base,base_long,aggregate,liber; also naive)")
            p.add_argument("--window", type=int, default=10, help="lifelong: ratings the "
                                                                  "ranker sees")
            p.add_argument("--long-window", type=int, default=200,
                           help="lifelong: ratings base_long sees")
            p.add_argument("--min-ratings", type=int, default=100,
                           help="lifelong: users with at least this many ratings")
            p.add_argument("--max-history", type=int, default=200,
                           help="lifelong: each history cut to its first N ratings")
            p.add_argument("--sample-share", type=float, default=0.2,
                           help="lifelong: samples from the last share of each history")
            p.add_argument("--llm", default="fastest", choices=["fastest", "settings"],
                           help="lifelong: summaries by the fastest backend here (vLLM, "
                                "bfloat16 with AMX) or exactly as the LIBER_LLM_* settings say")
            p.set_defaults(func=cmd_eval)

    p = sub.add_parser("status", help="lag, throughput, LLM cost and recent partition closes of a "
                                       "running pipeline (from Kafka and metrics endpoints)")
    p.add_argument("--metrics", action="append", metavar="URL",
                   help="a process's /metrics URL (repeatable; default: LIBER_METRICS_PORT)")
    p.add_argument("--window", type=float, default=2.0, help="seconds between the two scrapes")
    p.add_argument("--closes", type=int, default=10, help="recent partition closes to show")
    p.add_argument("--no-kafka", action="store_true", help="metrics endpoints only")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check-kafka", help="connect to LIBER_BOOTSTRAP_SERVERS with the configured "
                                            "security settings; one clear line when it fails")
    p.set_defaults(func=cmd_check_kafka)

    p = sub.add_parser("config", help="print the effective settings (secrets masked)")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.load(args.config)
    except SettingsError as exc:
        print(f"liber: invalid setting: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Client libraries log every connection at INFO; keep operators' logs to our own events.
    for noisy in ("kafka", "aiokafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    return args.func(settings, args) or 0


if __name__ == "__main__":
    sys.exit(main())
