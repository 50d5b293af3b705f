"""loopwatch's pytest plugin: fails (or warns about) async tests whose code blocks the event loop.
pytest loads it by itself once loopwatch is installed; it does nothing unless a test or the command
line asks.

Per test, class or module (``pytestmark``)::

    @pytest.mark.no_blocking(threshold_ms=20, allow=["myapp.legacy"], mode="fail")
    async def test_checkout(): ...

For the whole suite, every *async* test (a coroutine test function run by pytest-asyncio or anyio,
an ``unittest.IsolatedAsyncioTestCase`` method, or any test marked ``no_blocking``); sync tests are
not monitored and pay nothing::

    pytest --loopwatch [--loopwatch-threshold-ms=50] [--loopwatch-mode=fail|warn|off]
                       [--loopwatch-allow=PATTERN ...]

or in the ini file: ``loopwatch = true``, ``loopwatch_threshold_ms``, ``loopwatch_mode``,
``loopwatch_allow`` (one pattern a line). The command line wins over the ini file, and a marker's
arguments win over both for its tests (``allow`` adds to the suite's list). Markers nearer the test
win over those of its class and module. The default threshold is ``DEFAULT_THRESHOLD_MS`` (50 ms).

Modes: ``fail`` (the default) fails the test with one entry per blocking episode: the culprit, how
long the loop was blocked, where (file:line), and a short stack with the test's own frames first.
``warn`` lets it pass and emits a `BlockingCallWarning` with the same text, which lands in pytest's
warnings summary and never fails a test, whatever the warning filters (``filterwarnings = error``,
``-W error``: use ``fail`` to fail); ``off`` checks nothing
(``@pytest.mark.no_blocking(mode="off")`` exempts one test from ``--loopwatch``). Tests that
blocked are listed in a "loopwatch" section at the end of the run. A test that fails on its own
keeps its own failure; what it blocked is added as a report section.

Under ``LOOPWATCH=1`` (or ``loopwatch run -m pytest``), whole-program monitoring prints each
report as it happens: this plugin hands those lines to pytest's terminal, with capture suspended,
so that they are not kept with a passing test's captured stderr.

``allow`` silences known offenders. A pattern matches a module-qualified name on dot boundaries
(``requests``, ``time.sleep``, ``myapp.legacy``), a path if it contains ``/`` (a file or a
directory; relative paths are taken from the directory pytest was started in for
``--loopwatch-allow``, from the ini file's directory for ``loopwatch_allow``, and from the rootdir
for a marker), and ``*``, ``?``, ``[...]`` make a glob. An episode is allowed when a pattern
matches its culprit, or any frame on the way from the innermost frame of the project's own code
down to the culprit: ``allow=["requests"]`` accepts a ``socket.recv_into`` reached through
``requests.get``, ``allow=["app/legacy/"]`` anything that code in ``app/legacy/`` calls. (As with
``exclude_paths``, ``loopwatch``, ``asyncio`` and ``uvloop`` frames are never matched.)

What is checked: the test call, and the setup and teardown of the test's own *function-scoped*
fixtures (an episode there is named after the fixture; blocking in a teardown makes the test error
at teardown). Fixtures of wider scope are not checked and never blamed on a test. Everything that
runs on the event loop while a checked part runs counts, also background tasks that a wider
fixture started on a shared loop. Only asyncio loops on the main thread are seen (trio runs, and
loops in other threads, are not).

The ``loopwatch`` fixture gives a test its episodes, and requesting it turns monitoring on for that
test. On its own it only reports; a test that a marker or ``--loopwatch`` checks still fails (or
warns) for what it blocked, fixture or not (``.clear()`` forgets what the test has seen and
accepted)::

    async def test_cache_is_non_blocking(loopwatch):
        await warm_cache()
        assert loopwatch.culprits == []

``loopwatch.reports`` (the `BlockingCallInfo` of each episode not allowed), ``.allowed`` (those
the allow list silenced), ``.culprits`` (their names) and ``.clear()`` (forget them: they no longer
count against the test either). Reading them gives every episode up to that moment, also one that
ended a moment ago in the running task step (which is then reported as an episode of its own).

If the plugin itself fails, it emits one `LoopwatchPluginWarning` and stays off for the rest of the
run; the suite's own results are never changed by a loopwatch fault.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pytest

from loopwatch._limits import DEFAULT_THRESHOLD_MS

# pytest loads this plugin wherever loopwatch is installed: a broken native build must not stop
# a suite from running. The plugin then only says so, once.
try:
    from loopwatch import _native
    from loopwatch._monitor import EventLoopMonitor, _check_threshold
except ImportError as error:
    _CANNOT_LOAD: Optional[ImportError] = error
else:
    _CANNOT_LOAD = None
from loopwatch._report import BlockingCallInfo, StackFrame

if TYPE_CHECKING:
    from pluggy import Result

__all__ = ["BlockingCallWarning", "LoopwatchFixture", "LoopwatchPluginWarning"]

MODES = ("fail", "warn", "off")
MARKER = "no_blocking"
MAX_LISTED_EPISODES = 10
"""A failure lists this many episodes in full; the rest are counted by culprit."""
MAX_FRAMES = 8


class BlockingCallWarning(pytest.PytestWarning):
    """A test blocked the event loop (mode ``warn``)."""


class LoopwatchPluginWarning(pytest.PytestWarning):
    """loopwatch's pytest plugin failed; it is off for the rest of the run."""


class _UsageError(Exception):
    """A setting a user wrote is wrong; the message says which and why."""


# --- settings ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What applies to one test (or, before markers, to the suite)."""

    threshold_ms: float
    mode: str
    allow: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _MarkerSettings:
    """What a test's ``no_blocking`` markers say, merged (nearest marker wins)."""

    threshold_ms: Optional[float]
    mode: Optional[str]
    allow: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Suite:
    enabled: bool
    settings: _Settings


_SUITE = pytest.StashKey[_Suite]()
_MARKER_SETTINGS = pytest.StashKey[Optional[_MarkerSettings]]()
_STATE = pytest.StashKey["_PluginState"]()
_WATCH = pytest.StashKey["_Watch"]()


def _check_mode(mode: object) -> str:
    if mode not in MODES:
        raise _UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return str(mode)


def _checked_threshold(threshold_ms: object) -> float:
    try:
        return _check_threshold(threshold_ms)
    except (TypeError, ValueError) as error:
        raise _UsageError(str(error)) from None


def _anchor(pattern: str, base: Path) -> str:
    """Path patterns are matched against absolute file names: a relative one is taken from `base`."""
    if ("/" not in pattern and os.sep not in pattern) or pattern.startswith(("*", "?", "[")):
        return pattern
    anchored = os.path.normpath(os.path.join(base, os.path.expanduser(pattern)))
    return anchored + (os.sep if pattern.endswith(("/", os.sep)) else "")


def _check_allow(patterns: object, base: Path) -> tuple[str, ...]:
    if isinstance(patterns, (str, bytes)):
        raise _UsageError(f"allow must be a list of patterns, not a single string: use [{patterns!r}]")
    if not isinstance(patterns, Iterable):
        raise _UsageError(f"allow must be a list of patterns, got {type(patterns).__name__}")
    checked = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise _UsageError(f"allow must hold strings, got {type(pattern).__name__}: {pattern!r}")
        try:
            _native.Filters([pattern], [])
        except ValueError as error:
            raise _UsageError(str(error)) from None
        checked.append(_anchor(pattern, base))
    return tuple(checked)


def _suite_from_config(config: pytest.Config) -> _Suite:
    """The suite's settings: the command line over the ini file. `_UsageError` names the option."""
    ini_dir = config.inipath.parent if config.inipath is not None else config.rootpath
    enabled = bool(config.getoption("loopwatch") or config.getini("loopwatch"))

    threshold: object = config.getoption("loopwatch_threshold_ms")
    source = "--loopwatch-threshold-ms"
    if threshold is None:
        source = "loopwatch_threshold_ms (ini)"
        text = str(config.getini("loopwatch_threshold_ms")).strip()
        try:
            threshold = float(text) if text else DEFAULT_THRESHOLD_MS
        except ValueError:
            raise _UsageError(f"{source}: expected a number of milliseconds, got {text!r}") from None
    try:
        threshold_ms = _checked_threshold(threshold)
    except _UsageError as error:
        raise _UsageError(f"{source}: {error}") from None

    mode: object = config.getoption("loopwatch_mode")
    source = "--loopwatch-mode"
    if mode is None:
        source = "loopwatch_mode (ini)"
        mode = str(config.getini("loopwatch_mode")).strip() or "fail"
    try:
        checked_mode = _check_mode(mode)
    except _UsageError as error:
        raise _UsageError(f"{source}: {error}") from None

    allow: list[str] = []
    for source, patterns, base in (
        ("loopwatch_allow (ini)", config.getini("loopwatch_allow"), ini_dir),
        ("--loopwatch-allow", config.getoption("loopwatch_allow") or [], config.invocation_params.dir),
    ):
        try:
            allow.extend(_check_allow(patterns, base))
        except _UsageError as error:
            raise _UsageError(f"{source}: {error}") from None
    return _Suite(enabled, _Settings(threshold_ms, checked_mode, tuple(allow)))


def _marker_settings(item: pytest.Item) -> Optional[_MarkerSettings]:
    """The test's ``no_blocking`` markers merged, farthest first so that the nearest wins."""
    marks = list(item.iter_markers(name=MARKER))
    if not marks:
        return None
    threshold_ms: Optional[float] = None
    mode: Optional[str] = None
    allow: list[str] = []
    for mark in reversed(marks):
        if mark.args:
            raise _UsageError(
                f"takes keyword arguments only (threshold_ms=..., allow=[...], mode=...), got {mark.args!r}"
            )
        unknown = sorted(set(mark.kwargs) - {"threshold_ms", "allow", "mode"})
        if unknown:
            raise _UsageError(f"unknown argument {unknown[0]!r}: expected threshold_ms, allow or mode")
        if "threshold_ms" in mark.kwargs:
            threshold_ms = _checked_threshold(mark.kwargs["threshold_ms"])
        if "mode" in mark.kwargs:
            mode = _check_mode(mark.kwargs["mode"])
        if "allow" in mark.kwargs:
            allow.extend(_check_allow(mark.kwargs["allow"], item.config.rootpath))
    return _MarkerSettings(threshold_ms, mode, tuple(allow))


def _anyio_backend(item: pytest.Function) -> Optional[str]:
    """The anyio backend a parametrized test runs on (``"trio"``, ``("trio", {...})``), if any."""
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("anyio_backend") if callspec is not None else None
    if isinstance(backend, tuple) and backend:
        backend = backend[0]
    return backend if isinstance(backend, str) else None


def _is_async_test(item: pytest.Item) -> bool:
    if not isinstance(item, pytest.Function):
        return False
    unittest = sys.modules.get("unittest")  # pytest itself imports it only when needed
    cls = item.cls
    if unittest is not None and cls is not None and issubclass(cls, unittest.IsolatedAsyncioTestCase):
        return True  # asyncSetUp/asyncTearDown run on the loop even around a sync test method
    if _anyio_backend(item) not in (None, "asyncio"):
        return False  # anyio's trio backend runs no asyncio loop: nothing to watch, nothing to pay
    func = item.obj
    if inspect.iscoroutinefunction(func):
        return True
    try:
        return inspect.iscoroutinefunction(inspect.unwrap(func))
    except ValueError:  # a wrapper cycle
        return False


# --- allow patterns -------------------------------------------------------------------------------


class _AllowList:
    def __init__(self, patterns: Sequence[str]) -> None:
        self._filters = _native.Filters(list(patterns), []) if patterns else None

    def allows(self, info: BlockingCallInfo) -> bool:
        """Whether a pattern matches the culprit or a frame between it and the innermost frame of
        the project's own code (that frame included): the calls that led there from the user's code."""
        if self._filters is None:
            return False
        for frame in reversed(info.stack):
            if self._matches(frame):
                return True
            if frame.is_user_code:
                return False
        return False

    def _matches(self, frame: StackFrame) -> bool:
        assert self._filters is not None
        # The name is module-qualified but does not say where the module ends: try each prefix,
        # so that a module glob (`myapp.*.db`) sees the module as well as the whole name.
        parts = frame.name.split(".")
        return any(
            self._filters.allows(frame.name, ".".join(parts[:end]), frame.filename)
            for end in range(len(parts), 0, -1)
        )


# --- one test's monitoring ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Episode:
    info: BlockingCallInfo
    stage: str
    """The pytest phase it happened in: "setup", "call" or "teardown"."""
    part: str
    """What ran: "the test", "setup of fixture 'db'"."""
    allowed: bool


class _Watch:
    """Monitors one test: its call and its function-scoped fixtures. Parts nest (a fixture set up
    from inside another); ``None`` marks a part that is not checked (a wider fixture set up on the
    way), during which the hook is off."""

    def __init__(self, settings: _Settings, checked: bool) -> None:
        self.settings = settings
        self.checked = checked
        self.stage = "setup"
        self.episodes: list[_Episode] = []
        self._allow = _AllowList(settings.allow)
        self._monitor = EventLoopMonitor(
            threshold_ms=settings.threshold_ms, on_blocking_call=self._add, reports_per_minute=None
        )
        self._parts: list[Optional[str]] = []
        self._closed = False
        self._judged = 0
        self.fault: Optional[BaseException] = None

    def enter(self, part: Optional[str]) -> None:
        if self._closed:
            return
        self._switch(lambda: self._parts.append(part))

    def leave(self) -> None:
        if self._closed or not self._parts:
            return
        self._switch(self._parts.pop)

    def _switch(self, change: Callable[[], object]) -> None:
        # Off and on at each change of part: deactivating delivers what is waiting, so that each
        # episode is named after the part it happened in.
        if self._monitor.is_active:
            self._monitor.deactivate()
        change()
        if self._parts and self._parts[-1] is not None:
            self._monitor.activate()

    def close(self) -> None:
        self._closed = True
        self._parts.clear()
        self._monitor.deactivate()

    def flush(self) -> None:
        """Delivers every episode up to now, also what the running task step blocked so far."""
        self._monitor._flush()

    def _add(self, info: BlockingCallInfo) -> None:
        try:
            allowed = self._allow.allows(info)
            part = next((p for p in reversed(self._parts) if p is not None), "the test")
            self.episodes.append(_Episode(info, self.stage, part, allowed))
        except Exception as error:  # reported by the hook that next looks at this test
            self.fault = self.fault or error

    def take(self, stages: Sequence[str]) -> list[_Episode]:
        """Episodes of these stages not judged yet and not allowed."""
        new = [e for e in self.episodes[self._judged :] if e.stage in stages and not e.allowed]
        self._judged = len(self.episodes)
        return new

    def forget(self) -> None:
        self.flush()
        self.episodes.clear()
        self._judged = 0


class LoopwatchFixture:
    """What the ``loopwatch`` fixture gives a test: the blocking episodes found so far."""

    def __init__(self, watch: _Watch) -> None:
        self._watch = watch

    @property
    def threshold_ms(self) -> float:
        return self._watch.settings.threshold_ms

    @property
    def reports(self) -> list[BlockingCallInfo]:
        """Each episode that counts against the test, oldest first."""
        self._watch.flush()
        return [e.info for e in self._watch.episodes if not e.allowed]

    @property
    def allowed(self) -> list[BlockingCallInfo]:
        """Episodes the allow list silenced."""
        self._watch.flush()
        return [e.info for e in self._watch.episodes if e.allowed]

    @property
    def culprits(self) -> list[str]:
        """The culprit of each report in `reports`: ``["time.sleep", "json.dumps"]``."""
        return [info.method_name for info in self.reports]

    def clear(self) -> None:
        """Forgets the episodes found so far: they no longer fail (or warn about) the test."""
        self._watch.forget()

    def __repr__(self) -> str:
        count = len(self.reports)
        reports = "1 report" if count == 1 else f"{count} reports"
        return f"<loopwatch fixture: {reports}, threshold {self.threshold_ms:g} ms>"


# --- messages --------------------------------------------------------------------------------------


def _relative(info: BlockingCallInfo, base: Path) -> BlockingCallInfo:
    """The report with files under `base` named relative to it, as pytest names them."""
    prefix = os.path.join(str(base), "")

    def rel(filename: Optional[str]) -> Optional[str]:
        if filename is not None and filename.startswith(prefix):
            return filename[len(prefix) :]
        return filename

    # A relative name must resolve to the same file, for the user-code test in `format`.
    if os.getcwd() != str(base):
        return info
    stack = tuple(dataclasses.replace(f, filename=rel(f.filename)) for f in info.stack)
    return dataclasses.replace(info, filename=rel(info.filename), stack=stack)


def _times(count: int) -> str:
    return "1 time" if count == 1 else f"{count} times"


def _describe(episodes: Sequence[_Episode], settings: _Settings, stage: str, base: Path) -> str:
    where = " during fixture teardown" if stage == "teardown" else ""
    lines = [
        f"test blocked the event loop {_times(len(episodes))}{where} "
        f"(threshold {settings.threshold_ms:g} ms):"
    ]
    for episode in episodes[:MAX_LISTED_EPISODES]:
        text = _relative(episode.info, base).format(max_frames=MAX_FRAMES)
        if episode.part != "the test":
            text = f"[{episode.part}] {text}"
        lines += ["", text]
    rest = episodes[MAX_LISTED_EPISODES:]
    if rest:
        counts = Counter(e.info.method_name for e in rest)
        listed = ", ".join(f"{name} x{n}" for name, n in counts.most_common())
        lines += ["", f"... and {len(rest)} more: {listed}"]
    suggested = []
    for name in dict.fromkeys(e.info.method_name for e in episodes):
        try:
            _native.Filters([name], [])
            suggested.append(name)
        except ValueError:
            continue
    hint = "Move the blocking work off the loop (await asyncio.to_thread(...), an async client)"
    if suggested:
        hint += f", or accept a known offender: @pytest.mark.no_blocking(allow={suggested[:3]!r})"
    return "\n".join([*lines, "", hint + "."])


# --- the plugin's state for a run -------------------------------------------------------------------


@dataclasses.dataclass
class _Blocked:
    nodeid: str
    mode: str
    stage: str
    episodes: list[_Episode]


class _PluginState:
    def __init__(self) -> None:
        self.current: Optional[_Watch] = None
        self.broken = False
        self.blocked: list[_Blocked] = []

    def fault(self, error: BaseException) -> None:
        """A bug of the plugin: one warning, then the plugin is off; the suite goes on."""
        if self.broken:
            return
        self.broken = True
        where = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
        at = f" at {where[0].filename}:{where[0].lineno}" if where else ""
        warnings.warn(
            LoopwatchPluginWarning(
                f"loopwatch's pytest plugin failed and is off for the rest of this run "
                f"(a loopwatch bug, please report it): {type(error).__name__}: {error}{at}"
            ),
            stacklevel=2,
        )
        if self.current is not None:
            with contextlib.suppress(Exception):  # already failing: the warning says enough
                self.current.close()
            self.current = None


def _state(config: pytest.Config) -> _PluginState:
    return config.stash.setdefault(_STATE, _PluginState())


def _force_exception(outcome: Result[Any], error: BaseException) -> None:
    if hasattr(outcome, "force_exception"):
        outcome.force_exception(error)
    else:  # pluggy < 1.1 (possible with pytest 7.4): the same, by hand
        outcome._excinfo = type(error), error, error.__traceback__  # type: ignore[attr-defined]


# --- hooks ------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loopwatch", "loopwatch: find code that blocks the asyncio event loop")
    group.addoption(
        "--loopwatch",
        action="store_true",
        default=None,
        help="Check every async test for sync code that blocks the event loop "
        "(ini: loopwatch = true). Sync tests are not monitored.",
    )
    group.addoption(
        "--loopwatch-threshold-ms",
        type=float,
        default=None,
        metavar="MS",
        help=f"A task step or callback that keeps the loop this long is reported "
        f"(default {DEFAULT_THRESHOLD_MS:g} ms; ini: loopwatch_threshold_ms).",
    )
    group.addoption(
        "--loopwatch-mode",
        choices=MODES,
        default=None,
        help="fail (default): a test that blocked fails; warn: it passes with a BlockingCallWarning; "
        "off: tests are not checked, unless their marker sets a mode (ini: loopwatch_mode).",
    )
    group.addoption(
        "--loopwatch-allow",
        action="append",
        default=None,
        metavar="PATTERN",
        help="Accept blocking by this culprit or through this code: a module or function name "
        "(requests, time.sleep), a path (app/legacy/) or a glob. Repeatable (ini: loopwatch_allow).",
    )
    parser.addini("loopwatch", "Check every async test (as --loopwatch).", type="bool", default=False)
    parser.addini(
        "loopwatch_threshold_ms", f"Default {DEFAULT_THRESHOLD_MS:g} (as --loopwatch-threshold-ms)."
    )
    parser.addini("loopwatch_mode", "fail, warn or off (as --loopwatch-mode).")
    parser.addini(
        "loopwatch_allow",
        "Patterns of accepted culprits, one a line; paths relative to the ini file (as --loopwatch-allow).",
        type="linelist",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(threshold_ms={DEFAULT_THRESHOLD_MS:g}, allow=[], mode='fail'): fail (or warn) if "
        "this test blocks the asyncio event loop for threshold_ms or longer; allow lists accepted "
        "culprits (module, function or path patterns). See loopwatch.pytest_plugin.",
    )
    _show_whole_program_reports(config)
    state = _state(config)
    if _CANNOT_LOAD is not None:
        state.broken = True
        config.issue_config_time_warning(
            LoopwatchPluginWarning(
                f"loopwatch is installed but cannot load ({_CANNOT_LOAD}): no test is checked for "
                "blocking calls; reinstall loopwatch"
            ),
            stacklevel=2,
        )


def _show_whole_program_reports(config: pytest.Config) -> None:
    """Under ``LOOPWATCH=1`` (or ``loopwatch run -m pytest``) every report is printed to stderr
    as it happens, and pytest's capture would keep most of them from the user (it shows a
    test's stderr only if the test fails): send them to pytest's terminal, capture suspended, as
    pytest's live logging does."""
    autostart = sys.modules.get("loopwatch._autostart")  # imported only where it runs
    if autostart is None or not autostart.is_running():
        return

    def show(text: str) -> None:
        # Looked up at each report: the terminal reporter is registered after this plugin's
        # configure hook. Without one (`-p no:terminal`), the line goes to stderr after all.
        capture = config.pluginmanager.getplugin("capturemanager")
        terminal = config.pluginmanager.getplugin("terminalreporter")
        if capture is None or terminal is None:
            raise LookupError("no terminal")
        with capture.global_and_fixture_disabled():
            terminal.ensure_newline()
            for line in text.splitlines():
                terminal.write_line(line)

    autostart.set_output(show)
    config.add_cleanup(lambda: autostart.set_output(None))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # Here rather than in pytest_configure, so that `pytest --help` works with a bad ini value.
    if _state(session.config).broken:
        return
    try:
        session.config.stash[_SUITE] = _suite_from_config(session.config)
    except _UsageError as error:
        raise pytest.UsageError(f"loopwatch: {error}") from None


def pytest_report_header(config: pytest.Config) -> Optional[str]:
    suite = config.stash.get(_SUITE, None)
    if suite is None or not suite.enabled:
        return None
    settings = suite.settings
    allow = f", allow {', '.join(settings.allow)}" if settings.allow else ""
    return (
        f"loopwatch: checking async tests (threshold {settings.threshold_ms:g} ms, "
        f"mode {settings.mode}{allow})"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Result[Any], None]:
    outcome = yield
    state = _state(collector.config)
    if state.broken:
        return
    try:
        report: pytest.CollectReport = outcome.get_result()
        if not report.passed:
            return
        errors = []
        for node in report.result:
            if isinstance(node, pytest.Item):
                try:
                    node.stash[_MARKER_SETTINGS] = _marker_settings(node)
                except _UsageError as error:
                    errors.append(f"{node.nodeid}: @pytest.mark.{MARKER}: {error}")
        if errors:
            # A collection error, as for a bad @pytest.mark.parametrize: the run stops before a
            # test runs with a setting that was not meant.
            report.outcome = "failed"
            report.longrepr = "\n".join(errors)
    except Exception as error:
        state.fault(error)


def _watch_settings(item: pytest.Item, suite: _Suite) -> Optional[tuple[_Settings, bool]]:
    """The settings for this test and whether it is checked, or None when it is not monitored."""
    if _MARKER_SETTINGS in item.stash:
        marker = item.stash[_MARKER_SETTINGS]
    else:  # an item that did not come through collection's report: check its markers now
        try:
            marker = _marker_settings(item)
        except _UsageError as error:
            pytest.fail(f"{item.nodeid}: @pytest.mark.{MARKER}: {error}", pytrace=False)
    uses_fixture = "loopwatch" in getattr(item, "fixturenames", ())
    base = suite.settings
    if marker is None:
        settings = base
    else:
        settings = _Settings(
            threshold_ms=marker.threshold_ms if marker.threshold_ms is not None else base.threshold_ms,
            mode=marker.mode or base.mode,
            allow=base.allow + marker.allow,
        )
    asked = marker is not None or (suite.enabled and (uses_fixture or _is_async_test(item)))
    checked = asked and settings.mode != "off"
    if not checked and not uses_fixture:
        return None
    return settings, checked


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Result[None], None]:
    state = _state(item.config)
    suite = item.config.stash.get(_SUITE, None)
    if not state.broken and suite is not None:
        try:
            found = _watch_settings(item, suite)
            if found is not None:
                watch = _Watch(*found)
                item.stash[_WATCH] = watch
                state.current = watch
        except pytest.fail.Exception:
            raise
        except Exception as error:
            state.fault(error)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Result[Any], None]:
    state = _state(request.config)
    watch = state.current
    if watch is None or state.broken:
        yield
        return
    own = fixturedef.scope == "function"
    try:
        if own:
            # Finalizers run last-added first: this one, added before the fixture's own, runs
            # after its teardown; the one added after setup runs before it.
            fixturedef.addfinalizer(watch.leave)
        watch.enter(f"setup of fixture {fixturedef.argname!r}" if own else None)
    except Exception as error:
        state.fault(error)
        yield
        return
    yield
    try:
        watch.leave()
        if own:
            name = f"teardown of fixture {fixturedef.argname!r}"
            fixturedef.addfinalizer(lambda: watch.enter(name))
    except Exception as error:
        state.fault(error)


_VERDICT = pytest.StashKey["tuple[Optional[BaseException], str]"]()
"""For the call: the failure loopwatch raised (None if the test had already failed), and its text."""


def _judge(item: pytest.Item, watch: _Watch, stages: Sequence[str], outcome: Result[Any]) -> None:
    """Fails the test, or warns, for the new episodes of these stages."""
    episodes = watch.take(stages)
    if not episodes or not watch.checked:
        return
    if outcome.excinfo is not None and isinstance(outcome.excinfo[1], pytest.skip.Exception):
        return  # a skipped test is not judged
    stage = stages[-1]
    text = _describe(episodes, watch.settings, stage, item.config.invocation_params.dir)
    _state(item.config).blocked.append(_Blocked(item.nodeid, watch.settings.mode, stage, episodes))
    if watch.settings.mode == "warn":
        first = episodes[0].info
        filename, lineno = (first.filename, first.lineno or 0) if first.filename else (str(item.path), 0)
        # "Report, don't fail", whatever the suite's filters: `filterwarnings = error` or `-W
        # error` must not turn this warning into a failure. It still reaches pytest's record.
        with warnings.catch_warnings():
            warnings.simplefilter("always", BlockingCallWarning)
            warnings.warn_explicit(
                BlockingCallWarning(text),
                BlockingCallWarning,
                filename,
                lineno,
                module=getattr(getattr(item, "module", None), "__name__", None),
            )
        return
    error = None
    if outcome.excinfo is None:
        error = pytest.fail.Exception(text, pytrace=False)
        _force_exception(outcome, error)
    if stage == "call":
        item.stash[_VERDICT] = (error, text)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Result[None], None]:
    state = _state(item.config)
    watch = item.stash.get(_WATCH, None)
    if watch is None or state.broken:
        yield
        return
    try:
        watch.stage = "call"
        watch.enter("the test")
    except Exception as error:
        state.fault(error)
        yield
        return
    outcome = yield
    try:
        watch.leave()
        if watch.fault is not None:
            state.fault(watch.fault)
        else:
            _judge(item, watch, ("setup", "call"), outcome)
    except Exception as error:
        state.fault(error)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Result[pytest.TestReport], None]:
    outcome = yield
    verdict = item.stash.get(_VERDICT, None) if call.when == "call" else None
    if verdict is None:
        return
    # A test that failed on its own keeps its own failure, and what it blocked is shown beside it.
    # (A unittest case's own failure is known only here, where it replaces loopwatch's.)
    raised, text = verdict
    try:
        report = outcome.get_result()
        ours = raised is not None and call.excinfo is not None and call.excinfo.value is raised
        if report.failed and not ours:
            report.sections.append(("loopwatch: the test also blocked the event loop", text))
    except Exception as error:
        _state(item.config).fault(error)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, Result[None], None]:
    state = _state(item.config)
    watch = item.stash.get(_WATCH, None)
    if watch is not None:
        watch.stage = "teardown"
    outcome = yield
    if watch is None:
        return
    try:
        watch.close()
        if watch.fault is not None:
            state.fault(watch.fault)
        elif not state.broken:
            _judge(item, watch, ("teardown",), outcome)
    except Exception as error:
        state.fault(error)
    finally:
        if state.current is watch:
            state.current = None


@pytest.fixture(name="loopwatch")
def loopwatch_fixture(request: pytest.FixtureRequest) -> LoopwatchFixture:
    """The blocking episodes of this test (`LoopwatchFixture`); turns monitoring on for it."""
    watch = request.node.stash.get(_WATCH, None)
    if watch is None:
        # Requested by getfixturevalue() after setup began, or the plugin is off: watch from now on.
        suite = request.config.stash.get(_SUITE, None)
        settings = suite.settings if suite is not None else _Settings(DEFAULT_THRESHOLD_MS, "fail", ())
        watch = _Watch(settings, checked=False)
        request.node.stash[_WATCH] = watch
        state = _state(request.config)
        if not state.broken:
            state.current = watch
            watch.enter("the test")
    return LoopwatchFixture(watch)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    blocked = _state(config).blocked
    if not blocked:
        return
    tests = len({b.nodeid for b in blocked})
    terminalreporter.write_sep(
        "=", f"loopwatch: {tests} test{'s' if tests != 1 else ''} blocked the event loop"
    )
    for entry in blocked:
        worst = max(entry.episodes, key=lambda e: e.info.blamed_ms).info
        verdict = "WARNED" if entry.mode == "warn" else "ERROR" if entry.stage == "teardown" else "FAILED"
        where = " (fixture teardown)" if entry.stage == "teardown" else ""
        location = _relative(worst, config.invocation_params.dir).where
        via = f" (via {worst.via})" if worst.via else ""
        terminalreporter.write_line(
            f"{verdict} {entry.nodeid}{where}: {_times(len(entry.episodes))}, longest "
            f"{worst.method_name}{via} {worst.blamed_ms:.1f} ms at {location}"
        )
