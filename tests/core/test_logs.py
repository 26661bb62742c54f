"""Structured logs: one JSON object per line, events with their fields, secrets masked, level
honoured."""
from __future__ import annotations

import io
import json
import logging

import pytest

from core import logs
from core.settings import Settings


@pytest.fixture(autouse=True)
def restore_logging():
    """logs.setup replaces the root handlers: give the test session its own back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in logs.NOISY}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)


def capture(level: str = "INFO") -> io.StringIO:
    stream = io.StringIO()
    logs.setup(level, stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_record_is_one_json_line_with_event_fields():
    stream = capture()
    log = logging.getLogger("liber.test")
    log.info("plain message with\na newline")
    logs.event(log, "rebalance", phase="end", assigned=["t:0", "t:1"], seconds=0.5)
    logs.dead_letter(log, source_topic="behaviors", partition=1, offset=42, reason="late",
                     detail="x" * 500)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    plain, rebalance, dlq, failed = lines(stream)
    assert plain["msg"] == "plain message with\na newline" and "event" not in plain
    assert (plain["level"], plain["logger"]) == ("INFO", "liber.test")
    assert plain["ts"].endswith("Z")
    assert rebalance["event"] == "rebalance" and rebalance["assigned"] == ["t:0", "t:1"]
    assert rebalance["msg"] == "rebalance phase=end seconds=0.5"
    assert (dlq["event"], dlq["level"], dlq["reason"], dlq["offset"]) == ("dead_letter", "WARNING", "late", 42)
    assert len(dlq["detail"]) == 200
    assert "ValueError: boom" in failed["exc"]


def test_start_line_masks_secrets():
    stream = capture()
    settings = Settings.load(env={}, sasl_password="hunter2-secret", app_id="liber-logs")
    logs.started(logging.getLogger("liber.test"), "stream-worker", settings)
    (start,) = lines(stream)
    assert start["event"] == "start" and start["role"] == "stream-worker"
    assert start["config"]["app_id"] == "liber-logs" and start["config"]["sasl_password"] == "***"
    assert "hunter2-secret" not in stream.getvalue()


def test_level_is_honoured_and_client_libraries_are_quiet():
    stream = capture("WARNING")
    log = logging.getLogger("liber.test")
    logs.event(log, "start", role="x")
    log.warning("kept")
    logging.getLogger("kafka.conn").info("connecting")
    assert [line["msg"] for line in lines(stream)] == ["kept"]
    capture("DEBUG")
    assert logging.getLogger("kafka").level == logging.WARNING

