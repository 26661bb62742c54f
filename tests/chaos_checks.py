"""The invariants every reduced chaos run in the tests must meet, whatever its fault."""
from __future__ import annotations

from liber import invariants


def assert_invariants(result: dict) -> dict:
    """Fault reached, drained, no unexpected exit, nothing lost or doubled, versions only
    grow, every event accounted for; returns the invariants' report."""
    report = result["invariants"]
    assert result["injected"].get("reached", True), result["injected"]
    assert result["drained"] and not result["unexpected_exits"], result
    assert (result["lost"], result["duplicate_summaries"], result["version_regressions"]) == \
        (0, 0, 0), report["examples"]
    violations = {name: report[name] for name in invariants.Report.VIOLATIONS if report[name]}
    assert report["ok"], {**violations, "examples": report["examples"]}
    assert result["events_in"] == result["events_accounted"] == result["events_sent"]
    return report
