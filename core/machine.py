"""The machine a figure was measured on: every benchmark prints this in its JSON."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """CPU model, cores, Python, and the 1-minute load average now (the machine is shared)."""
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}
    if hasattr(os, "getloadavg"):
        out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out
