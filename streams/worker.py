"""Run the stream worker (Faust) until SIGTERM/SIGINT.

Crash safety: Faust writes the local RocksDB store at once but sends the matching changelog
record later, so after a crash the local store may hold writes that never reached Kafka. A
clean stop leaves a marker; a start without it discards the local store and rebuilds it from
the changelog, the durable truth. (Replayed input is then skipped by the per-user offset kept
in the state, see streams/app.py.)
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from liber import logs
from liber.settings import Settings
from ops import metrics

log = logging.getLogger("liber.stream")
CLEAN_MARKER = "CLEAN_SHUTDOWN"


def discard_unclean_state(table_dir: Path) -> bool:
    """Remove local table stores left by a crash; returns True when something was removed."""
    marker = table_dir / CLEAN_MARKER
    if marker.exists():
        marker.unlink()  # from now on we are running: a crash leaves no marker
        return False
    if table_dir.exists() and any(table_dir.iterdir()):
        shutil.rmtree(table_dir)
        return True
    return False


def run(settings: Settings) -> None:
    import faust  # heavy import: only for the process that runs the worker

    from streams.app import create_app

    logs.started(log, "stream-worker", settings)
    settings.state_path.mkdir(parents=True, exist_ok=True)
    metrics.start(settings, {"stream": settings.state_path / settings.app_id})
    app = create_app(settings)
    from ops import faust_ops
    faust_ops.attach(app)  # records in/out, rebalances, recovery progress
    table_dir = Path(app.conf.tabledir)
    if discard_unclean_state(table_dir):
        log.warning("unclean shutdown before: local RocksDB state in %s discarded, "
                    "recovering it from the changelog", table_dir)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True,
                          override_logging=False)  # keep liber.logs' JSON lines
    clean = False
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        clean = exc.code in (0, None)
        raise
    finally:
        if clean:
            table_dir.mkdir(parents=True, exist_ok=True)
            (table_dir / CLEAN_MARKER).touch()
            log.info("stream worker stopped cleanly")
