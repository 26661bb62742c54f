"""A tiny real UIF artifact (models.training.train_tiny_artifact), built once per test session
and shared by the test modules that consume artifacts (fusion worker, ranker)."""
from __future__ import annotations

import fcntl
from pathlib import Path

from models.artifact import resolve
from models.training import train_tiny_artifact


def tiny_artifact(tmp_path_factory, settings) -> Path:
    root = tmp_path_factory.getbasetemp() / "uif-tiny-artifact"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:  # pytest-xdist workers share the base temp
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return resolve(root)
        except Exception:  # noqa: BLE001 - not built yet
            return train_tiny_artifact(settings, root)
