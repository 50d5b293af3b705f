"""A pytest plugin for the reliability suite: writes each test's outcome, one JSON object a line,
to the file named by ``LOOPWATCH_RELIABILITY_OUT`` (node id, outcome, and whether a failure was
loopwatch's own report of a block), so that runs of a third-party suite can be compared test by
test. Loaded with ``-p outcomes_plugin`` from this directory."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

_outcomes: dict[str, dict[str, Any]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # A test's outcome is its worst phase: an error in setup or teardown, a failed call.
    entry = _outcomes.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed"})
    if report.when == "call" or report.outcome != "passed":
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.failed and report.when != "call":
            outcome = "error"
        if entry["outcome"] in ("passed", "skipped") or outcome == "error":
            entry["outcome"] = outcome
        if report.failed:
            entry["blocked"] = "blocked the event loop" in str(report.longrepr)


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("LOOPWATCH_RELIABILITY_OUT")
    if not path:
        return
    with open(path, "w", encoding="utf-8") as out:
        for entry in _outcomes.values():
            out.write(json.dumps(entry) + "\n")
