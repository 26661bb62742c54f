"""`liber`: the command line of LIBER-Stream. Every command reads the same Settings."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from liber.settings import Settings, SettingsError


def _broker(settings: Settings, args):
    from ops.local_kafka import LocalKafka
    data_dir = Path(args.data_dir or Path(settings.home) / "broker")
    port = args.port or int(settings.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    return LocalKafka(settings.home, data_dir, port=port)


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
    from streams.topics import create_topics
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
    from streams.topics import create_topics
    create_topics(settings, log=lambda m: None)
    result = replay(settings, args.dataset, rate=args.rate, limit=args.limit, users=args.users,
                    items=not args.no_items, progress=not args.quiet)
    print(json.dumps(result.__dict__))
    return 0


def cmd_worker(settings: Settings, args) -> int:
    from streams.topics import create_topics
    from streams.worker import run
    create_topics(settings, log=logging.getLogger("liber").info)
    run(settings)
    return 0


def cmd_demo(settings: Settings, args) -> int:
    from liber.demo import run_demo
    return run_demo(settings, dataset=args.dataset, users=args.users, show=args.show)


def cmd_models(settings: Settings, args) -> int:
    from llm_workers import model_store
    print(f"{model_store.DEFAULT_MODEL}: {model_store.model_dir(settings.home)}")
    return 0


def bench_stream(settings: Settings, args) -> dict:
    from streams.bench_stream import run
    return run(settings, dataset=args.dataset or "ml-1m", limit=args.limit,
               log=lambda m: print(m, file=sys.stderr))


def bench_dare(settings: Settings, args) -> dict:
    from llm_workers.dare.bench import run
    return run(args, settings)


# Benchmark name -> function(settings, args) returning the JSON-able result.
BENCHMARKS = {"stream": bench_stream, "dare": bench_dare}


def cmd_bench(settings: Settings, args) -> int:
    result = BENCHMARKS[args.benchmark](settings, args)
    print(json.dumps(result, indent=None if args.json else 2))
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
    p.add_argument("--no-items", action="store_true", help="skip the item catalogue")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("worker", help="run the stream worker (UBSP agent, RocksDB state)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("demo", help="local broker + MovieLens replay + worker, then show results")
    p.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m"])
    p.add_argument("--users", type=int, help="replay only the first N users")
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
    from llm_workers.dare.bench import add_arguments as dare_arguments  # stdlib-only import
    dare_arguments(p.add_argument_group("dare (retrieval-pool speculative decoding)"))
    p.set_defaults(func=cmd_bench)

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
