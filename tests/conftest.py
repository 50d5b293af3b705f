"""Shared helpers: run a coroutine on each kind of loop, and collect reports."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import site
import sys
import textwrap
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from loopwatch import BlockingCallInfo, event_loop_monitor_ctx

THRESHOLD_MS = 30.0
BLOCK_S = 0.1  # comfortably over the threshold, even on a busy machine

LOOPS = ["asyncio"]
try:
    import uvloop

    LOOPS.append("uvloop")
except ImportError:  # uvloop is a test dependency; without it only the default loop is tested
    uvloop = None


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@pytest.fixture(params=LOOPS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return request.param


# The two ways the exact mode sees a thread's calls: sys.monitoring exists from 3.12 (and is the
# default there); the legacy profile hook everywhere. Modules about the exact mode's own workings
# use `pytestmark = pytest.mark.usefixtures("exact_backend")`.
EXACT_BACKENDS = ["legacy", "monitoring"] if sys.version_info >= (3, 12) else ["legacy"]
# Modules that pin what every way of seeing must answer alike (`usefixtures("backend")`) also run
# in the always-on mode ("sampling", 3.11+, asyncio's own loops), through `monitor()`; where that
# mode answers otherwise, the test asserts its answer and says why.
BACKENDS = [*EXACT_BACKENDS, "sampling"] if sys.version_info >= (3, 11) else EXACT_BACKENDS
C_LOOPS_BY_CONTEXT = sys.version_info >= (3, 14)
"""From 3.14 loopwatch tells uvloop's callbacks apart by the contexts they run in: the always-on
mode sees uvloop, and both modes see a C function it calls back."""
MODE = "exact"
"""The mode `monitor()` makes monitors in: set by the `backend` fixture."""


@pytest.fixture(params=EXACT_BACKENDS)
def exact_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LOOPWATCH_BACKEND", request.param)
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "sampling":
        if (
            "loop_kind" in request.fixturenames
            and request.getfixturevalue("loop_kind") != "asyncio"
            and not C_LOOPS_BY_CONTEXT
        ):
            pytest.skip("before 3.14 the always-on mode sees asyncio's own loops only")
        monkeypatch.setitem(globals(), "MODE", "sampling")
    else:
        monkeypatch.setenv("LOOPWATCH_BACKEND", request.param)
    return request.param


def watched() -> Optional[str]:
    """How loopwatch watches the calling thread now ("monitoring", "legacy"), or None."""
    from loopwatch import _native

    return _native._watched()


@pytest.fixture
def run(loop_kind: str) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Runs `main()` to completion on a fresh loop of the parametrized kind."""

    def runner(main: Callable[[], Awaitable[Any]]) -> Any:
        loop = new_loop(loop_kind)
        try:
            return loop.run_until_complete(main())
        finally:
            loop.close()
            asyncio.set_event_loop(None)

    return runner


def monitor(**kwargs: Any) -> tuple[Any, list[BlockingCallInfo]]:
    """A monitoring context whose reports land in the returned list."""
    reports: list[BlockingCallInfo] = []
    kwargs.setdefault("threshold_ms", THRESHOLD_MS)
    if MODE != "exact":
        kwargs.setdefault("mode", MODE)
    return event_loop_monitor_ctx(on_blocking_call=reports.append, **kwargs), reports


def names(info: BlockingCallInfo) -> list[str]:
    return [frame.name for frame in info.stack]


def short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def items_summed_in(seconds: float) -> int:
    """How many items `sum(range(n))` adds up in about `seconds` here: one C call that holds the
    GIL that long, measured on this machine and interpreter rather than guessed. The fastest of
    five runs: one that lost its CPU meanwhile would make every later call too short."""
    n = 1_000_000
    fastest = math.inf
    for _ in range(5):
        start = time.perf_counter()
        sum(range(n))
        fastest = min(fastest, time.perf_counter() - start)
    return int(seconds / (fastest / n))


def busy(seconds: float) -> int:
    """Holds the GIL in Python code for `seconds` (an inline CPU loop)."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


@pytest.fixture(autouse=True)
def no_profiler_left_behind():
    before = sys.getprofile()
    yield
    assert sys.getprofile() is before, "a test left a profile function installed"
    assert watched() is None, "a test left the thread watched"
    if sys.version_info >= (3, 12):
        tools = [sys.monitoring.get_tool(tool) for tool in range(6)]
        assert "loopwatch" not in tools, "a test left loopwatch's sys.monitoring tool id taken"


# ---- real programs in subprocesses ------------------------------------------------------------

PTH_NAME = "loopwatch_autostart.pth"
REPO_PTH = Path(__file__).parent.parent / "python" / PTH_NAME


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any LOOPWATCH* setting of the machine running the tests."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOOPWATCH")}
    env.update(extra)
    return env


def write(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source).lstrip())
    return path


def line_of(path: Path, marker: str) -> int:
    """The line of `path` that carries the comment `# <marker>`."""
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if text.rstrip().endswith(f"# {marker}"):
            return number
    raise AssertionError(f"no line marked {marker!r} in {path}")


def headlines(stderr: str) -> list[str]:
    """The first line of each report printed as it happened."""
    return [line for line in stderr.splitlines() if "blocked the event loop" in line]


def installed_pth() -> Optional[Path]:
    """The .pth that a wheel install puts at the root of site-packages, if this one has it."""
    roots = [*site.getsitepackages(), site.getusersitepackages()]
    return next((Path(root) / PTH_NAME for root in roots if (Path(root) / PTH_NAME).exists()), None)


@pytest.fixture
def autostart_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which Python processes read the .pth at start-up as an installed wheel
    does. An editable install (maturin develop) does not install the .pth: there a site
    directory holding a copy of the repository's .pth is added at start-up instead (by a
    sitecustomize on PYTHONPATH, which child processes inherit)."""
    if installed_pth() is not None:
        return clean_env()
    if not REPO_PTH.exists():
        pytest.skip(f"{PTH_NAME} is neither installed nor in the source tree")
    shim = tmp_path / "site-shim"
    shim.mkdir()
    shutil.copy(REPO_PTH, shim / PTH_NAME)
    # The site directory is added twice, as site does for a venv's own site-packages (it runs
    # their .pth lines twice): monitoring must start once all the same.
    add = "site.addsitedir(os.path.dirname(os.path.abspath(__file__)))\n"
    write(shim / "sitecustomize.py", "import os, site\n" + add + add)
    return clean_env(PYTHONPATH=os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))
