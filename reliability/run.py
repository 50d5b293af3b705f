"""The reliability suite: third-party test suites (pinned releases, from their sdists) run without
loopwatch and in each of its modes, compared test by test. loopwatch must change no outcome:
a test that passes, fails, errors or is skipped without it does the same with it. The one
expected difference is fail mode failing a test for a block it really made, which is listed.

    python reliability/run.py --python VENV/bin/python --work DIR

Prints one row per suite and mode (outcomes, wall time against the baseline) and every
difference with the test's name; exit status 1 when a difference holds on reruns."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent

# Each suite: its package (pinned in constraints.txt) and the pytest arguments its project's own
# CI would use here (httpx marks the tests that need the internet, which this machine lacks).
# Left out: tests whose outcome follows the machine's speed, not the code. httpx's write-timeout
# test gives a 100 MB body to loopback 1 µs: it fails here without loopwatch, and any profile
# hook, by slowing the write, can make it pass.
SUITES: dict[str, list[str]] = {
    "starlette": [],
    "httpx": ["-m", "not network", "--deselect", "tests/test_timeouts.py::test_write_timeout"],
}
RERUNS = 2
"""A difference is confirmed only if it shows again in each of this many reruns of the test,
with and without loopwatch: the suites have a few timing-dependent tests of their own."""


@dataclass
class Mode:
    name: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def modes(work: Path) -> list[Mode]:
    found = [
        Mode("baseline"),
        Mode("plugin warn", ["--loopwatch", "--loopwatch-mode=warn"]),
        Mode("plugin fail", ["--loopwatch"]),
        Mode("LOOPWATCH=1", env={"LOOPWATCH": "1", "LOOPWATCH_RECORD": str(work / "whole-program.lwrec")}),
    ]
    if sys.version_info >= (3, 11):  # run.py runs on the interpreter it tests
        record = str(work / "always-on.lwrec")
        always_on = {"LOOPWATCH": "1", "LOOPWATCH_MODE": "sampling", "LOOPWATCH_RECORD": record}
        found.append(Mode("always on", env=always_on))
    return found


@dataclass
class Run:
    outcomes: dict[str, str]
    blocked: set[str]
    """Tests whose failure is loopwatch's report of a block."""
    seconds: float


def run_pytest(python: str, source: Path, suite_args: list[str], mode: Mode, out: Path, tests=()) -> Run:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOOPWATCH")}
    env.update(mode.env)
    env["LOOPWATCH_RELIABILITY_OUT"] = str(out)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    command = [python, "-m", "pytest", "-p", "no:cacheprovider", "-p", "outcomes_plugin", "-q"]
    command += [*suite_args, *mode.args, *tests]
    out.unlink(missing_ok=True)  # a run that dies must not leave an earlier run's outcomes to read
    started = time.monotonic()
    subprocess.run(
        command, cwd=source, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800
    )
    seconds = time.monotonic() - started
    if not out.exists():
        raise SystemExit(f"reliability: pytest wrote no outcomes for {source.name} ({mode.name}): {command}")
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    return Run(
        {e["nodeid"]: e["outcome"] for e in entries},
        {e["nodeid"] for e in entries if e.get("blocked")},
        seconds,
    )


def fetch(python: str, package: str, work: Path) -> Path:
    """The package's sdist, at its pinned version, unpacked under `work`."""
    sdists = work / "sdists"
    sdists.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            package,
            "-d",
            str(sdists),
        ],
        check=True,
    )
    [archive] = sorted(sdists.glob(f"{package}-*.tar.gz"))
    source = work / "src" / archive.name[: -len(".tar.gz")]
    if not source.exists():
        with tarfile.open(archive) as tar:
            if sys.version_info >= (3, 12):
                tar.extractall(work / "src", filter="data")
            else:
                tar.extractall(work / "src")  # our own download of a pinned release
    return source


def counts(outcomes: dict[str, str]) -> str:
    tally: dict[str, int] = {}
    for outcome in outcomes.values():
        tally[outcome] = tally.get(outcome, 0) + 1
    order = ["passed", "failed", "error", "skipped", "xfailed", "xpassed"]
    return ", ".join(f"{tally[o]} {o}" for o in order if o in tally)


def confirmed(
    python: str, source: Path, suite_args: list[str], mode: Mode, baseline: Mode, work: Path, tests: list[str]
) -> dict[str, tuple[str, str]]:
    """Of the tests that differed, those that differ the same way in every rerun."""
    holding = set(tests)
    seen: dict[str, tuple[str, str]] = {}
    for attempt in range(RERUNS):
        if not holding:
            break
        ids = sorted(holding)
        plain = run_pytest(python, source, suite_args, baseline, work / f"rerun-base-{attempt}.jsonl", ids)
        watched = run_pytest(python, source, suite_args, mode, work / f"rerun-mode-{attempt}.jsonl", ids)
        for test in ids:
            pair = (plain.outcomes.get(test, "missing"), watched.outcomes.get(test, "missing"))
            if pair[0] == pair[1] or (test in watched.blocked and mode.name == "plugin fail"):
                holding.discard(test)
            else:
                seen[test] = pair
    return {test: seen[test] for test in holding}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--python", required=True, help="the venv's python, with loopwatch and the suites' deps"
    )
    parser.add_argument("--work", required=True, type=Path, help="where sdists, sources and outcomes go")
    args = parser.parse_args(argv)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    version = subprocess.run(
        [args.python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    failures = 0
    rows = []
    for package, suite_args in SUITES.items():
        source = fetch(args.python, package, work)
        all_modes = modes(work / source.name)
        (work / source.name).mkdir(exist_ok=True)
        baseline = all_modes[0]
        base = run_pytest(args.python, source, suite_args, baseline, work / source.name / "baseline.jsonl")
        watched_runs = []
        for mode in all_modes[1:]:
            out = work / source.name / f"{mode.name.replace(' ', '-').replace('=', '')}.jsonl"
            watched = run_pytest(args.python, source, suite_args, mode, out)
            differ = sorted(
                t
                for t in set(base.outcomes) | set(watched.outcomes)
                if base.outcomes.get(t) != watched.outcomes.get(t)
            )
            blocked = [t for t in differ if mode.name == "plugin fail" and t in watched.blocked]
            held = confirmed(
                args.python,
                source,
                suite_args,
                mode,
                baseline,
                work / source.name,
                [t for t in differ if t not in blocked],
            )
            note = f"{len(blocked)} failed for a real block" if blocked else ""
            watched_runs.append((mode, watched, note))
            for test in blocked:
                print(f"  blocked  {source.name} [{mode.name}] {test}")
            for test, (plain, monitored) in sorted(held.items()):
                failures += 1
                where = f"{source.name} [{mode.name}] {test}"
                print(f"  DIFFERS  {where}: {plain} without loopwatch, {monitored} with it")
            for test in sorted(set(differ) - set(blocked) - set(held)):
                print(f"  flaky    {source.name} [{mode.name}] {test}: differed once, not on rerun")
        # The baseline once more, last: wall times are against the mean of the runs before and
        # after the monitored ones, so that a machine warming up favours neither side.
        again = run_pytest(args.python, source, suite_args, baseline, work / source.name / "baseline-2.jsonl")
        base_seconds = (base.seconds + again.seconds) / 2
        for test in sorted(t for t in base.outcomes if again.outcomes.get(t) != base.outcomes[t]):
            print(f"  flaky    {source.name} [baseline] {test}: differs between two runs without loopwatch")
        rows.append((source.name, baseline.name, counts(base.outcomes), 1.0, f"{base_seconds:.1f} s"))
        for mode, watched, note in watched_runs:
            rows.append(
                (source.name, mode.name, counts(watched.outcomes), watched.seconds / base_seconds, note)
            )
    print(
        f"\nReliability suite on CPython {version} (outcomes test by test; wall time against the baseline):"
    )
    for suite, mode, tally, ratio, note in rows:
        print(f"  {suite:<18} {mode:<12} {tally:<48} {ratio:5.2f}x  {note}")
    if failures:
        print(f"reliability: {failures} test(s) changed outcome under loopwatch")
        return 1
    print("reliability: every test had the same outcome with and without loopwatch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
