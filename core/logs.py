"""Structured logs for the long-running processes: one JSON object per line.

Every record becomes `{"ts", "level", "logger", "msg", ...}`; events of interest (start,
rebalance, recovery progress, dead letters) also carry `"event"` and their fields as keys, so a
log shipper or `grep '"event": "dead_letter"'` finds them without parsing prose. Settings are
logged through `Settings.summary()`, which masks secrets.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

# Attribute names on a LogRecord (set through `extra=`), unlikely to clash with logging's own.
_EVENT, _FIELDS = "liber_event", "liber_fields"
# Client libraries log every connection at INFO; operators' logs keep to our own events.
NOISY = ("kafka", "aiokafka")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name}
        event = getattr(record, _EVENT, None)
        if event:
            out["event"] = event
        out["msg"] = record.getMessage()
        for key, value in (getattr(record, _FIELDS, None) or {}).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup(level: str = "INFO", stream=None) -> logging.Handler:
    """Route the root logger to one JSON-lines handler at `level` (replacing earlier handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    return handler


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields) -> None:
    """Log event `name` with `fields` as keys of its JSON line (and `k=v` in its message)."""
    if not logger.isEnabledFor(level):
        return
    text = " ".join(f"{k}={v}" for k, v in fields.items() if not isinstance(v, (dict, list)))
    logger.log(level, f"{name} {text}".strip(), extra={_EVENT: name, _FIELDS: fields})


def started(logger: logging.Logger, role: str, settings) -> None:
    """The start line: role, pid and every setting (secrets masked)."""
    event(logger, "start", role=role, pid=os.getpid(), config=settings.summary())


def dead_letter(logger: logging.Logger, *, source_topic: str, partition, offset, reason: str,
                detail: str) -> None:
    event(logger, "dead_letter", logging.WARNING, source_topic=source_topic, partition=partition,
          offset=offset, reason=reason, detail=detail[:200])
