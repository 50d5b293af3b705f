"""The pytest plugin as a user meets it: sample projects run by a real, separate pytest, under
pytest-asyncio (strict and auto mode), anyio and unittest, and the example project in
examples/pytest_demo run the way its README says."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
HAS_TRIO = importlib.util.find_spec("trio") is not None

# Each sample run is a fresh pytest: keep out what could change its results (the parent's cache,
# and pyleak, another tool watching event loops that may be installed next to loopwatch).
ISOLATION = ("-p", "no:cacheprovider", "-p", "no:pyleak")

INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
"""

# A sync client in the project's own code, and one in an installed library.
LEGACY_CLIENT = """
import time

def fetch():
    time.sleep(0.1)
"""
SLOWLIB = """
import time

def fetch():
    time.sleep(0.1)
"""
CONFTEST = """
import os, sys

# slowlib stands for an installed library: its files are under a site-packages directory.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vendor", "site-packages"))
"""


def line_of(source: str, tag: str) -> int:
    """The line number of the line that carries `# <tag>` in a sample's source."""
    lines = textwrap.dedent(source).lstrip("\n").splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.rstrip().endswith(f"# {tag}"))


def section(output: str, title: str) -> str:
    """The part of pytest's output under the ``____ title ____`` header, up to the next header."""
    match = re.search(
        rf"^_+ {re.escape(title)} _+\n(.*?)(?=^_{{3,}} |^={{3,}} |^-{{3,}} |\Z)", output, re.S | re.M
    )
    assert match, f"no section {title!r} in:\n{output}"
    return match.group(1)


def blocked_ms(text: str, culprit: str = "time.sleep") -> list[float]:
    return [
        float(ms) for ms in re.findall(rf"{re.escape(culprit)} blocked the event loop for ([\d.]+) ms", text)
    ]


def write_libraries(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.mkpydir("legacy")
    (pytester.path / "legacy" / "client.py").write_text(textwrap.dedent(LEGACY_CLIENT))
    slowlib = pytester.path / "vendor" / "site-packages" / "slowlib"
    slowlib.mkdir(parents=True)
    (slowlib / "__init__.py").write_text(textwrap.dedent(SLOWLIB))


CORE = """
import asyncio
import time

import pytest
import pytest_asyncio

import legacy.client
import slowlib

pytestmark = pytest.mark.asyncio


@pytest.mark.no_blocking
async def test_blocks():
    await asyncio.sleep(0)
    time.sleep(0.1)  # BLOCKS


@pytest.mark.no_blocking
async def test_fixed():
    await asyncio.sleep(0.1)


@pytest.mark.no_blocking
async def test_fails_on_its_own():
    time.sleep(0.1)  # OWN-FAILURE-BLOCKS
    assert 1 == 2, "the test's own failure"


@pytest.mark.no_blocking(mode="warn")
async def test_warns():
    time.sleep(0.1)  # WARNS


@pytest.mark.no_blocking(allow=["time.sleep"])
async def test_allowed_by_culprit(loopwatch):
    time.sleep(0.1)
    await asyncio.sleep(0)
    assert loopwatch.reports == []
    assert [info.method_name for info in loopwatch.allowed] == ["time.sleep"]


@pytest.mark.no_blocking(allow=["legacy/"])
async def test_allowed_by_path(loopwatch):
    legacy.client.fetch()
    await asyncio.sleep(0)
    assert loopwatch.reports == [] and len(loopwatch.allowed) == 1


@pytest.mark.no_blocking(allow=["slowlib"])
async def test_allowed_through_a_library_frame(loopwatch):
    slowlib.fetch()
    await asyncio.sleep(0)
    assert loopwatch.reports == [] and len(loopwatch.allowed) == 1


@pytest.mark.no_blocking(allow=["*/test_core.py"])
async def test_allow_stops_at_the_innermost_user_frame():
    # The test's own file is further out than legacy/client.py, the user code that blocked.
    legacy.client.fetch()


@pytest_asyncio.fixture
async def slow_setup():
    time.sleep(0.1)  # SETUP-BLOCKS
    yield


@pytest_asyncio.fixture
async def slow_teardown():
    yield
    time.sleep(0.1)  # TEARDOWN-BLOCKS


@pytest.fixture(scope="session")
def warmed_cache():
    async def warm():
        time.sleep(0.1)
    asyncio.run(warm())


@pytest.mark.no_blocking
async def test_setup_blocks(slow_setup):
    await asyncio.sleep(0)


@pytest.mark.no_blocking
async def test_teardown_blocks(slow_teardown):
    await asyncio.sleep(0)


@pytest.mark.no_blocking
async def test_a_session_fixture_is_not_blamed(warmed_cache, loopwatch):
    await asyncio.sleep(0)
    assert loopwatch.reports == [] and loopwatch.allowed == []


async def test_the_fixture_reports_without_failing(loopwatch):
    assert loopwatch.reports == []
    time.sleep(0.1)  # FIXTURE-BLOCKS
    await asyncio.sleep(0)
    assert loopwatch.culprits == ["time.sleep"]
    info = loopwatch.reports[0]
    assert info.filename == __file__ and info.duration_ms >= 90
    assert loopwatch.threshold_ms == 30


async def warm_cache():
    await asyncio.sleep(0)
    time.sleep(0.1)  # blocks after its last await


async def test_the_fixture_has_a_block_that_ended_a_moment_ago(loopwatch):
    await warm_cache()
    assert loopwatch.culprits == ["time.sleep"]
    assert repr(loopwatch) == "<loopwatch fixture: 1 report, threshold 30 ms>"
    await asyncio.sleep(0)
    assert loopwatch.culprits == ["time.sleep"]  # reported once


@pytest.mark.no_blocking
async def test_clearing_the_fixture_forgives(loopwatch):
    time.sleep(0.1)
    await asyncio.sleep(0)
    assert len(loopwatch.reports) == 1
    loopwatch.clear()
    assert loopwatch.reports == []


class TestTolerant:
    pytestmark = pytest.mark.no_blocking(threshold_ms=500)

    async def test_under_the_class_threshold(self, loopwatch):
        time.sleep(0.1)
        await asyncio.sleep(0)
        assert loopwatch.threshold_ms == 500 and loopwatch.reports == []

    @pytest.mark.no_blocking(threshold_ms=30)
    async def test_the_nearest_marker_wins(self):
        time.sleep(0.1)
"""


def test_markers_fail_warn_allow_and_check_the_tests_own_fixtures(pytester: pytest.Pytester) -> None:
    write_libraries(pytester)
    pytester.makeini(INI + "loopwatch_threshold_ms = 30\n")
    pytester.makepyfile(test_core=CORE)
    result = pytester.runpytest_subprocess(*ISOLATION, "--strict-markers")
    out = result.stdout.str()
    result.assert_outcomes(failed=5, passed=11, errors=1)

    # One clear line, then each episode: culprit, duration, where, the user's frame first.
    blocks = section(out, "test_blocks")
    lines = blocks.splitlines()
    assert lines[0] == "test blocked the event loop 1 time (threshold 30 ms):"
    assert len(blocked_ms(blocks)) == 1 and blocked_ms(blocks)[0] >= 90
    line = line_of(CORE, "BLOCKS")
    assert f"  at test_core.py:{line}" in lines
    yours = lines.index("  your code (innermost first):")
    assert lines[yours + 1].startswith(f"    test_core.py:{line} in test_core.test_blocks (coroutine)")
    assert lines.index("  libraries and C (innermost first):") > yours
    assert "    time.sleep [C]" in blocks and "allow=['time.sleep']" in blocks
    # No traceback of the plugin, of pytest or of pytest-asyncio.
    assert "Traceback" not in blocks and "pytest_plugin.py" not in blocks and "def " not in blocks

    # A test that fails on its own shows its own failure; what it blocked is shown beside it.
    own = section(out, "test_fails_on_its_own")
    assert "AssertionError: the test's own failure" in own
    assert f"test_core.py:{line_of(CORE, 'OWN-FAILURE-BLOCKS')} in test_core.test_fails_on_its_own" in out
    assert "loopwatch: the test also blocked the event loop" in out

    # Function-scoped fixtures are checked and named; a teardown that blocks is an error there.
    setup = section(out, "test_setup_blocks")
    assert "[setup of fixture 'slow_setup'] time.sleep blocked the event loop" in setup
    assert f"test_core.py:{line_of(CORE, 'SETUP-BLOCKS')} in test_core.slow_setup" in setup
    teardown = section(out, "ERROR at teardown of test_teardown_blocks")
    assert teardown.startswith(
        "test blocked the event loop 1 time during fixture teardown (threshold 30 ms):"
    )
    assert f"test_core.py:{line_of(CORE, 'TEARDOWN-BLOCKS')} in test_core.slow_teardown" in teardown

    # allow reaches from the culprit out to the innermost frame of the project's own code, no further.
    assert "legacy/client.py:5 in legacy.client.fetch" in section(
        out, "test_allow_stops_at_the_innermost_user_frame"
    )
    assert "test blocked the event loop 1 time (threshold 30 ms):" in section(
        out, "TestTolerant.test_the_nearest_marker_wins"
    )

    # warn: the test passes and the same text lands in the warnings summary.
    warned = out[out.index("warnings summary") :]
    assert "test_core.py::test_warns" in warned
    assert (
        f"test_core.py:{line_of(CORE, 'WARNS')}: BlockingCallWarning: test blocked the event loop 1 time"
        in warned
    )
    assert warned.count("BlockingCallWarning") == 1

    # The closing section lists every test that blocked.
    assert "loopwatch: 7 tests blocked the event loop" in out
    warns = line_of(CORE, "WARNS")
    closing = (
        rf"^WARNED test_core.py::test_warns: 1 time, longest time.sleep [\d.]+ ms at test_core.py:{warns} in "
    )
    assert re.search(closing + r"test_core\.test_warns$", out, re.M)
    assert "FAILED test_core.py::test_teardown_blocks (fixture teardown)" not in out
    assert "ERROR test_core.py::test_teardown_blocks (fixture teardown)" in out


SUITE = """
import asyncio
import importlib.util
import sys
import time
import unittest

import anyio
import pytest
from loopwatch import _native

import legacy.client

BACKENDS = ["asyncio"] + (["trio"] if importlib.util.find_spec("trio") else [])


@pytest.fixture(params=BACKENDS)
def anyio_backend(request):
    return request.param


async def blocking():
    time.sleep(0.1)


@pytest.mark.asyncio
async def test_asyncio_blocks():
    time.sleep(0.1)  # ASYNCIO-BLOCKS


@pytest.mark.asyncio
async def test_asyncio_fixed():
    await asyncio.sleep(0.1)


def test_sync_is_not_checked():
    time.sleep(0.1)
    asyncio.run(blocking())


@pytest.mark.anyio
async def test_anyio_blocks(anyio_backend):
    if anyio_backend == "trio":  # no asyncio loop to watch: the hook is not even installed
        assert sys.getprofile() is None and _native._watched() is None
    time.sleep(0.1)  # ANYIO-BLOCKS


@pytest.mark.anyio
async def test_anyio_fixed():
    await anyio.sleep(0.1)


@pytest.mark.asyncio
@pytest.mark.no_blocking(mode="off")
async def test_exempt():
    time.sleep(0.1)


@pytest.mark.asyncio
async def test_allowed_from_the_command_line():
    legacy.client.fetch()


class TestService(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        await asyncio.sleep(0)

    async def test_blocks(self):
        time.sleep(0.1)  # UNITTEST-BLOCKS

    async def test_fixed(self):
        await asyncio.sleep(0.1)

    async def test_fails_on_its_own(self):
        time.sleep(0.1)
        self.assertEqual(1, 2)
"""


def test_the_loopwatch_option_checks_every_async_test_under_each_runner(pytester: pytest.Pytester) -> None:
    write_libraries(pytester)
    pytester.makeini(INI)
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess(
        *ISOLATION, "--loopwatch", "--loopwatch-threshold-ms=30", "--loopwatch-allow=legacy/"
    )
    out = result.stdout.str()
    # trio (when installed) runs no asyncio loop: nothing to see there, nothing to fail.
    result.assert_outcomes(failed=4, passed=6 + (2 if HAS_TRIO else 0))
    assert "loopwatch: checking async tests (threshold 30 ms, mode fail, allow " in out

    for title, tag in [
        ("test_asyncio_blocks", "ASYNCIO-BLOCKS"),
        ("test_anyio_blocks[asyncio]", "ANYIO-BLOCKS"),
        ("TestService.test_blocks", "UNITTEST-BLOCKS"),
    ]:
        text = section(out, title)
        assert text.startswith("test blocked the event loop 1 time (threshold 30 ms):"), title
        assert f"  at test_suite.py:{line_of(SUITE, tag)}" in text, title
        assert blocked_ms(text) and min(blocked_ms(text)) >= 90, title

    own = section(out, "TestService.test_fails_on_its_own")
    assert "AssertionError: 1 != 2" in own
    assert "loopwatch: the test also blocked the event loop" in out
    assert not re.search(r"^FAILED test_suite.py::test_(sync|exempt|allowed)", out, re.M)


AUTO = """
import time

import pytest

import legacy.client


async def test_blocks_and_warns():
    time.sleep(0.1)


async def test_allowed_by_the_ini_file():
    legacy.client.fetch()


def test_sync():
    time.sleep(0.1)


@pytest.mark.no_blocking(mode="fail")
async def test_the_marker_overrides_the_mode():
    time.sleep(0.1)
"""


def test_ini_options_in_auto_mode(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    write_libraries(pytester)
    pytester.makeini(
        INI
        + "asyncio_mode = auto\nloopwatch = true\nloopwatch_threshold_ms = 30\nloopwatch_mode = warn\n"
        + "loopwatch_allow =\n    legacy/\n"
    )
    tests = pytester.mkdir("tests")
    (tests / "test_auto.py").write_text(textwrap.dedent(AUTO))
    # Run from tests/: the ini file's relative path pattern is still taken from its own directory.
    monkeypatch.chdir(tests)
    result = pytester.runpytest_subprocess(*ISOLATION)
    out = result.stdout.str()
    result.assert_outcomes(failed=1, passed=3)
    warned = out[out.index("warnings summary") :]
    assert warned.count("BlockingCallWarning: test blocked the event loop 1 time (threshold 30 ms):") == 1
    assert "test_auto.py::test_blocks_and_warns" in warned
    assert "test_allowed_by_the_ini_file" not in warned and "test_sync" not in warned
    assert "loopwatch: 2 tests blocked the event loop" in out
    assert "FAILED tests/test_auto.py::test_the_marker_overrides_the_mode: 1 time" in out


@pytest.mark.parametrize(
    ("ini", "args", "message"),
    [
        (
            "",
            ["--loopwatch-allow=no good"],
            'ERROR: loopwatch: --loopwatch-allow: bad path pattern "no good": it is neither a module name',
        ),
        (
            "loopwatch_threshold_ms = fast\n",
            [],
            "ERROR: loopwatch: loopwatch_threshold_ms (ini): expected a number of milliseconds, got 'fast'",
        ),
    ],
    ids=["command-line", "ini"],
)
def test_a_bad_setting_is_a_usage_error(
    pytester: pytest.Pytester, ini: str, args: list[str], message: str
) -> None:
    pytester.makeini(INI + ini)
    pytester.makepyfile("async def test_nothing(): pass")
    result = pytester.runpytest_subprocess(*ISOLATION, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = result.stderr.str()
    assert message in errors
    assert "Traceback" not in errors and "Traceback" not in result.stdout.str()


def test_a_bad_marker_is_a_collection_error_naming_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.no_blocking(allow="requests")
        async def test_single_string():
            pass

        @pytest.mark.no_blocking(treshold_ms=10)
        async def test_typo():
            pass

        @pytest.mark.no_blocking(threshold_ms=-1)
        async def test_negative():
            pass

        @pytest.mark.no_blocking(allow=["no good"])
        async def test_bad_pattern():
            pass
        """
    )
    result = pytester.runpytest_subprocess(*ISOLATION)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    out = result.stdout.str()
    assert "ERROR collecting test_bad.py" in out
    for expected in [
        "test_bad.py::test_single_string: @pytest.mark.no_blocking: allow must be a list of patterns, "
        "not a single string: use ['requests']",
        "test_bad.py::test_typo: @pytest.mark.no_blocking: unknown argument 'treshold_ms': "
        "expected threshold_ms, allow or mode",
        "test_bad.py::test_negative: @pytest.mark.no_blocking: threshold_ms must be > 0 and finite, got -1",
        'test_bad.py::test_bad_pattern: @pytest.mark.no_blocking: bad path pattern "no good"',
    ]:
        assert expected in out
    assert "Traceback" not in out


BUGGY_LINE = "        digest = hash_password(password, salt)\n"
FIXED_LINE = "        digest = await asyncio.to_thread(hash_password, password, salt)\n"


def run_demo(demo: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m pytest --loopwatch <demo>``, as the demo's README says, in a clean environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", *ISOLATION, "--loopwatch", os.path.relpath(demo, cwd)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_demo_fails_for_its_blocking_login_and_passes_with_the_one_line_fix(tmp_path: Path) -> None:
    demo = REPO / "examples" / "pytest_demo"
    result = run_demo(demo, REPO)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "configfile: pytest.ini" in out  # the demo's own, not the repository's pyproject.toml
    assert "1 failed, 2 passed" in out
    failure = section(out, "test_the_right_password_logs_in")
    assert failure.startswith("test blocked the event loop 1 time (threshold 20 ms):")
    # The summary line names the user's own line: the call that hashes, in accounts.py.
    headline = r"pbkdf2_hmac blocked the event loop for [\d.]+ ms in task '[^']+' at "
    assert re.search(
        headline + r"examples/pytest_demo/accounts\.py:16 in accounts\.hash_password$", failure, re.M
    )
    assert "examples/pytest_demo/accounts.py:34 in accounts.AccountService.login (coroutine)" in failure

    # The fix the README gives, applied to a copy.
    fixed = tmp_path / "pytest_demo"
    shutil.copytree(demo, fixed, ignore=shutil.ignore_patterns("__pycache__"))
    service = fixed / "accounts.py"
    source = service.read_text()
    assert source.count(BUGGY_LINE) == 1
    assert FIXED_LINE.strip() in (demo / "README.md").read_text()
    service.write_text(source.replace(BUGGY_LINE, FIXED_LINE))
    result = run_demo(fixed, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    assert "blocked the event loop" not in result.stdout


def test_a_broken_install_warns_once_and_never_stops_the_suite(pytester: pytest.Pytester) -> None:
    # The native module fails to import, as after a bad build or an interpreter upgrade.
    site = pytester.mkdir("broken_site")
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['loopwatch._native'] = None\n")
    pytester.makeini(INI)
    pytester.makepyfile(
        test_sample="""
        import time
        import pytest

        @pytest.mark.no_blocking(threshold_ms=30)
        @pytest.mark.asyncio
        async def test_blocks():
            time.sleep(0.1)

        def test_sync():
            assert True
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--loopwatch", "-W", "default", *ISOLATION],
        cwd=pytester.path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    assert result.stdout.count("loopwatch is installed but cannot load") == 1, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
