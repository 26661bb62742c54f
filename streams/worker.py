"""Run the stream worker (Faust) until SIGTERM/SIGINT."""
from __future__ import annotations

import json
import logging

from liber.settings import Settings
from ops import metrics


def run(settings: Settings) -> None:
    import faust  # heavy import: only for the process that runs the worker

    from streams.app import create_app

    logging.getLogger("liber").info("stream worker starting: %s",
                                    json.dumps(settings.summary(), default=str))
    settings.state_path.mkdir(parents=True, exist_ok=True)
    metrics.serve(settings.metrics_host, settings.metrics_port)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    worker.execute_from_commandline()
