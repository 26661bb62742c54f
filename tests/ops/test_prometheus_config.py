"""`promtool` (Debian's prometheus package, installed by ops/setup.sh) accepts the scrape
config and the alert rules, and the rules' unit tests pass: each alert fires on the series
that should fire it, and stays silent on the ones that should not."""
from __future__ import annotations

import subprocess
from pathlib import Path

from ops.local_prometheus import binary

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "ops" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], cwd=PROMETHEUS_DIR, capture_output=True,
                          text=True, timeout=120)


def test_scrape_config_and_rule_files_check():
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "alerts.yml" in done.stdout + done.stderr  # the rules are loaded with the config


def test_alert_rules_check():
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_unit_tests():
    done = promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
