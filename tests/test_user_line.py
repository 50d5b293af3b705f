"""The user's line first: a report's summary line names the culprit, the library call the user's
code made on the way to it, and the line of the user's own code that led there."""

from __future__ import annotations

import asyncio
import importlib
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import THRESHOLD_MS, line_of, monitor
from loopwatch import BlockingCallInfo, event_loop_monitor_ctx, read_recording

# A client library, installed (under a site-packages directory), that reads from a "socket".
SLOWCLIENT = """
import time

def _read():
    time.sleep(0.1)

def get(url):
    return _read()
"""
# The user's own service, calling that library.
SERVICES = """
import slowclient

def get_inventory():
    return slowclient.get("http://inventory/")  # calls the library
"""
# The user's own package, installed into site-packages too (as `pip install .` does).
MYAPP = """
import time

def load():
    time.sleep(0.1)  # myapp blocks
"""


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    site = tmp_path / "venv" / "lib" / "site-packages"
    (site / "myapp").mkdir(parents=True)
    (site / "slowclient.py").write_text(textwrap.dedent(SLOWCLIENT))
    (site / "myapp" / "__init__.py").write_text("")
    (site / "myapp" / "service.py").write_text(textwrap.dedent(MYAPP))
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "services.py").write_text(textwrap.dedent(SERVICES))
    sys.path[:0] = [str(tmp_path), str(site)]
    importlib.invalidate_caches()
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.path.remove(str(site))
        for name in ("slowclient", "shop", "shop.services", "myapp", "myapp.service"):
            sys.modules.pop(name, None)


def test_a_library_culprit_names_the_library_call_and_the_users_line(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from shop.services import get_inventory

    async def handler() -> None:
        get_inventory()

    async def main() -> None:
        # Reports to the `loopwatch` logger, as a service without a callback gets them.
        async with event_loop_monitor_ctx(threshold_ms=THRESHOLD_MS):
            await asyncio.create_task(handler(), name="inventory")

    caplog.set_level(logging.WARNING, logger="loopwatch")
    asyncio.run(main())
    [record] = caplog.records
    info = record.loopwatch  # type: ignore[attr-defined]
    services = project / "shop" / "services.py"
    where = f"{services}:{line_of(services, 'calls the library')} in shop.services.get_inventory"
    assert (info.method_name, info.via, info.where) == ("time.sleep", "slowclient.get", where)
    assert info.user_frame.name == "shop.services.get_inventory"
    summary = record.getMessage().splitlines()[0]
    assert summary == (
        f"time.sleep (via slowclient.get) blocked the event loop for {info.duration_ms:.1f} ms "
        f"in task 'inventory' at {where}"
    )
    assert str(info).splitlines()[0] == summary


def test_a_culprit_the_users_code_calls_itself_has_no_via(run) -> None:
    import time

    ctx, reports = monitor()

    def fetch_profile() -> None:
        time.sleep(0.1)

    async def main() -> None:
        with ctx:
            fetch_profile()

    run(main)
    [info] = reports
    line = fetch_profile.__code__.co_firstlineno + 1
    assert info.via is None
    # (Before 3.11 a code object knows no qualified name: the function's own name stands for it.)
    assert info.where.startswith(f"{__file__}:{line} in test_user_line.")
    assert info.where.endswith(".fetch_profile")
    assert info.headline().endswith(f" at {info.where}")


def test_a_culprit_in_the_users_code_is_located_at_its_own_line(run) -> None:
    from conftest import busy

    ctx, reports = monitor()

    def crunch() -> None:
        busy(0.1)

    async def main() -> None:
        with ctx:
            crunch()

    run(main)
    [info] = reports
    assert info.user_frame is info.stack[-1]
    assert info.via is None
    assert info.headline().endswith(f" at {info.location}")


def test_include_paths_make_an_installed_package_your_code(project: Path) -> None:
    from myapp.service import load

    service = project / "venv" / "lib" / "site-packages" / "myapp" / "service.py"

    async def main() -> None:
        load()

    def watch(**settings: object) -> list[BlockingCallInfo]:
        ctx, reports = monitor(**settings)

        async def monitored() -> None:
            with ctx:
                await main()

        asyncio.run(monitored())
        return reports

    # Without include_paths, a file under site-packages is a library: the user's code is this test.
    [plain] = watch()
    assert plain.user_frame is not None and plain.user_frame.name.endswith(".main")
    assert plain.via == "myapp.service.load"
    # With them, what they include is the user's code, wherever it is installed.
    [included] = watch(include_paths=["myapp"])
    assert included.method_name == "myapp.service.load"
    assert included.user_frame is included.stack[-1]
    assert included.where == f"{service}:{line_of(service, 'myapp blocks')}"
    assert included.headline().endswith(f" at {included.where}")


def test_a_recording_keeps_what_the_monitor_took_for_the_users_code(project: Path, tmp_path: Path) -> None:
    from myapp.service import load

    path = tmp_path / "run.lwrec"
    ctx, reports = monitor(include_paths=["myapp"], record_to=path)

    async def main() -> None:
        with ctx:
            load()

    asyncio.run(main())
    [live] = reports
    [read] = read_recording(path).episodes
    # Read elsewhere, the file name alone would say "library": the recording says what was decided.
    assert [f.is_user_code for f in read.stack] == [f.is_user_code for f in live.stack]
    assert (read.where, read.via) == (live.where, live.via)
    assert read.headline() == live.headline()


def test_loopwatch_report_names_the_users_line_under_each_culprit(project: Path, tmp_path: Path) -> None:
    from shop.services import get_inventory

    path = tmp_path / "inventory.lwrec"
    ctx, _ = monitor(record_to=path)

    async def main() -> None:
        with ctx:
            get_inventory()

    asyncio.run(main())
    result = subprocess.run(
        [sys.executable, "-m", "loopwatch", "report", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    [row] = [line for line in lines if line.startswith("  1  time.sleep ")]
    services = project / "shop" / "services.py"
    assert lines[lines.index(row) + 1] == (
        f"     at {services}:{line_of(services, 'calls the library')} in shop.services.get_inventory, "
        "via slowclient.get"
    )
