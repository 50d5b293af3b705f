"""``loopwatch report``: grouping and statistics on known episodes, then the command itself run as a
subprocess on real recording files (text, --json, --html, errors, pipes and a terminal)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from loopwatch import BlockingCallInfo, Recording, StackFrame, read_recording
from loopwatch._html import MAX_BARS, render_html
from loopwatch._recording import open_recorder
from loopwatch._reporting import PROGRESS_FROM_BYTES, percentile, render_json, summarize

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
PID = os.getpid()  # the process that writes the test recordings, as a monitored program would
ANSI_CLEAR_LINE = "\r\x1b[K"


def episode(
    name: str,
    ms: float,
    at: float = T0,
    *,
    thread_id: int = 1,
    process_id: int = PID,
    frames: int = 1,
    **fields: Any,
) -> BlockingCallInfo:
    """An episode as the monitor would report it: `frames` levels of the user's code over the culprit."""
    callers = [
        StackFrame(f"app.layer{k}.handle", f"/srv/app/layer{k}.py", 10 + k, ms, is_coroutine=k == 0)
        for k in range(frames)
    ]
    stack = (*callers, StackFrame(name, "/srv/app/work.py", 42, ms))
    return BlockingCallInfo(
        method_name=name,
        duration_ms=ms,
        timestamp=at,
        filename="/srv/app/work.py",
        lineno=42,
        stack=stack,
        thread_id=thread_id,
        process_id=process_id,
        culprit_duration_ms=ms,
        **fields,
    )


# a: 10, 20, 30, 40 (total 100); b: 150 (total 150); c: 5, 5 (total 10); all blocked: 260 ms
KNOWN = [
    episode("app.a", 10.0, T0 + 0.0),
    episode("app.b", 150.0, T0 + 1.0, task_name="req-b"),
    episode("app.a", 40.0, T0 + 2.0, task_name="worst-a"),
    episode("app.c", 5.0, T0 + 3.0),
    episode("app.a", 30.0, T0 + 4.0),
    episode("app.a", 20.0, T0 + 5.0),
    episode("app.c", 5.0, T0 + 6.0),
]


def recording(episodes: list[BlockingCallInfo], problem: Optional[str] = None) -> Recording:
    return Recording("known.lwrec", (), tuple(episodes), problem)


def write_recording(path: Path, episodes: list[BlockingCallInfo]) -> Path:
    """A real recording file, through the recorder the monitor uses."""
    recorder = open_recorder(path, truncate=True)
    for info in episodes:
        recorder.write(info)
    return path


def report(*args: str, **popen: Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TZ="UTC", PYTHONUNBUFFERED="1")
    popen.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(
        [sys.executable, "-m", "loopwatch", "report", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=120,
        **popen,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("loopwatch: error: ")
    return lines[0]


# ---- statistics ------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile(list(range(1, 201)), 99) == 198
    assert percentile(list(range(1, 11)), 99) == 10  # under 100 samples, p99 is the max
    assert percentile([7.5], 50) == percentile([7.5], 99) == 7.5


def test_culprits_are_grouped_by_name_with_exact_statistics_worst_first() -> None:
    summary = summarize(recording(KNOWN))
    assert [c.culprit for c in summary.culprits] == ["app.b", "app.a", "app.c"]
    b, a, c = summary.culprits
    assert (a.count, a.total_ms, a.p50_ms, a.p99_ms, a.max_ms) == (4, 100.0, 20.0, 40.0, 40.0)
    assert (b.count, b.total_ms, b.p50_ms, b.p99_ms, b.max_ms) == (1, 150.0, 150.0, 150.0, 150.0)
    assert (c.count, c.total_ms, c.p50_ms, c.p99_ms, c.max_ms) == (2, 10.0, 5.0, 5.0, 5.0)
    assert summary.blocked_ms == 260.0
    assert a.share == pytest.approx(100 / 260) and b.share == pytest.approx(150 / 260)
    assert a.worst.task_name == "worst-a"  # the example is the culprit's longest episode
    assert summary.first_at == T0 and summary.last_at == pytest.approx(T0 + 6.005)
    assert summary.process_ids == (PID,)


def test_equal_totals_rank_the_more_frequent_culprit_first_then_by_name() -> None:
    summary = summarize(
        recording(
            [episode("z.once", 20.0), episode("y.twice", 10.0), episode("y.twice", 10.0), episode("a", 20.0)]
        )
    )
    assert [c.culprit for c in summary.culprits] == ["y.twice", "a", "z.once"]


def test_kinds_are_counted_per_culprit() -> None:
    summary = summarize(
        recording([episode("f", 10.0), episode("f", 12.0, kind="callback"), episode("g", 9.0, kind="step")])
    )
    kinds = {c.culprit: dict(c.kinds) for c in summary.culprits}
    assert kinds == {"f": {"call": 1, "callback": 1}, "g": {"step": 1}}


# ---- text --------------------------------------------------------------------------------------


def test_text_report_of_a_recording_file_has_header_table_and_worst_stacks(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "known.lwrec", KNOWN)
    result = report(str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    lines = out.splitlines()
    assert lines[0] == f"loopwatch report: {path}"
    assert lines[1] == "  1 process, 7 episodes, 260.0 ms blocked"
    assert lines[2] == "  from 2023-11-14 22:13:20 to 22:13:26 (6.0 s)"
    rows = [line for line in lines if re.match(r"\s+\d+  app\.", line)]
    assert [row.split() for row in rows] == [
        ["1", "app.b", "1", "150.0", "57.7%", "150.0", "150.0", "150.0"],
        ["2", "app.a", "4", "100.0", "38.5%", "20.0", "40.0", "40.0"],
        ["3", "app.c", "2", "10.0", "3.8%", "5.0", "5.0", "5.0"],
    ]
    # Under each row, where the user's code led to the culprit (in its worst episode).
    assert lines[lines.index(rows[1]) + 1] == "     at /srv/app/work.py:42"
    assert f"2. app.a: 40.0 ms at 2023-11-14 22:13:22.000, pid {PID}" in out
    assert "app.a blocked the event loop for 40.0 ms in task 'worst-a'" in out
    # The example stack puts the user's frames first, like BlockingCallInfo.format().
    worst_a = out[out.index("2. app.a") :]
    assert worst_a.index("your code") < worst_a.index("/srv/app/layer0.py:10")


def test_table_fits_a_terminal_and_long_culprit_names_keep_their_end(tmp_path: Path) -> None:
    long_name = "company.platform.services.billing.invoices.rendering.InvoiceRenderer.render_pdf_page"
    path = write_recording(
        tmp_path / "long.lwrec", [episode(long_name, 12345.6), episode("time.sleep", 20.0)]
    )
    out = report(str(path)).stdout
    table = out[out.index("  #  culprit") : out.index("Worst episode")]
    # The numbers fit; the line under a row holds a path, which is never cut.
    assert all(len(line) <= 100 for line in table.splitlines() if not line.startswith("     at ")), table
    assert "  ...g.InvoiceRenderer.render_pdf_page " in table  # 36 characters, the end kept
    assert long_name not in table


def test_top_limits_the_culprits_and_says_how_many_more(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "known.lwrec", KNOWN)
    out = report(str(path), "--top", "1").stdout
    assert re.search(r"^\s+1  app\.b ", out, re.M)
    assert "app.a" not in out and "app.c" not in out.split("more culprits")[1]
    assert "... 2 more culprits (110.0 ms, 42.3%); --top 3 shows all" in out


def test_an_empty_recording_says_nothing_blocked(tmp_path: Path) -> None:
    path = tmp_path / "empty.lwrec"
    open_recorder(path, truncate=True)  # the file's header only: a session with no episode
    result = report(str(path))
    assert result.returncode == 0 and result.stderr == ""
    assert "0 episodes" in result.stdout
    assert "No episodes: nothing blocked the loop" in result.stdout


# ---- JSON ----------------------------------------------------------------------------------------

DOCUMENT_KEYS = {
    "format",
    "version",
    "file",
    "problem",
    "sessions",
    "processes",
    "episodes",
    "steps",
    "blocked_ms",
    "first_at",
    "last_at",
    "percentiles",
    "unfinished_stalls",
    "culprits_total",
    "culprits",
}
CULPRIT_KEYS = {
    "rank",
    "culprit",
    "is_c_call",
    "kinds",
    "count",
    "total_ms",
    "share",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "cpu_wait_ms",
    "gc_ms",
    "example",
}
EXAMPLE_KEYS = {
    "timestamp",
    "duration_ms",
    "culprit_duration_ms",
    "kind",
    "process_id",
    "thread_id",
    "task_name",
    "context",
    "filename",
    "lineno",
    "where",
    "via",
    "stack",
}
FRAME_KEYS = {
    "name",
    "filename",
    "lineno",
    "end_lineno",
    "duration_ms",
    "is_c_call",
    "is_coroutine",
    "is_user_code",
}


def test_json_is_one_document_with_the_documented_keys_and_exact_numbers(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "known.lwrec", KNOWN)
    result = report(str(path), "--json", "--top", "2")
    assert result.returncode == 0 and result.stderr == ""
    document = json.loads(result.stdout)
    assert set(document) == DOCUMENT_KEYS
    assert (document["format"], document["version"], document["problem"]) == ("loopwatch-report", 1, None)
    assert (document["episodes"], document["blocked_ms"], document["culprits_total"]) == (7, 260.0, 3)
    assert document["steps"] == 7
    assert document["first_at"] == T0 and document["last_at"] == pytest.approx(T0 + 6.005)
    assert document["processes"] == 1
    assert [s["process_id"] for s in document["sessions"]] == [PID]
    assert [c["culprit"] for c in document["culprits"]] == ["app.b", "app.a"]
    a = document["culprits"][1]
    assert set(a) == CULPRIT_KEYS
    assert {k: a[k] for k in ("rank", "count", "total_ms", "p50_ms", "p99_ms", "max_ms")} == {
        "rank": 2,
        "count": 4,
        "total_ms": 100.0,
        "p50_ms": 20.0,
        "p99_ms": 40.0,
        "max_ms": 40.0,
    }
    assert a["share"] == round(100 / 260, 6) and a["kinds"] == {"call": 4}
    example = a["example"]
    assert set(example) == EXAMPLE_KEYS
    assert (example["task_name"], example["duration_ms"], example["timestamp"]) == ("worst-a", 40.0, T0 + 2)
    assert all(set(frame) == FRAME_KEYS for frame in example["stack"])
    assert [frame["name"] for frame in example["stack"]] == ["app.layer0.handle", "app.a"]  # outermost first


def test_a_step_with_two_culprits_counts_its_blocked_time_once_and_each_culprit_its_share(
    tmp_path: Path,
) -> None:
    # One 125 ms step whose calls app.a (60 ms) and app.b (60 ms) were each over the threshold:
    # two reports of one episode, each with the step's duration and its own share; then app.a
    # alone in a 30 ms step. Written to a real recording and read back by the command.
    two = {"episode_id": 7, "culprits_in_episode": 2}
    episodes = [
        episode("app.a", 125.0, T0, share_ms=60.0, **two),
        episode("app.b", 125.0, T0, share_ms=60.0, **two),
        episode("app.a", 30.0, T0 + 1.0, episode_id=8),
    ]
    path = write_recording(tmp_path / "two.lwrec", episodes)
    document = json.loads(report(str(path), "--json").stdout)
    assert (document["episodes"], document["steps"], document["blocked_ms"]) == (3, 2, 155.0)
    totals = {c["culprit"]: (c["count"], c["total_ms"], c["max_ms"]) for c in document["culprits"]}
    assert totals == {"app.a": (2, 90.0, 60.0), "app.b": (1, 60.0, 60.0)}
    assert math.fsum(c["share"] for c in document["culprits"]) <= 1.0
    read = read_recording(path).episodes
    assert [(e.episode_id, e.culprits_in_episode, e.share_ms) for e in read] == [
        (7, 2, 60.0),
        (7, 2, 60.0),
        (8, 1, 30.0),
    ]
    assert "one of 2 culprits of one 125.0 ms step" in read[0].headline()


def test_every_json_key_is_documented_in_the_module_docstring() -> None:
    import loopwatch._reporting as module

    document = render_json(summarize(recording(KNOWN)))
    culprit = document["culprits"][0]
    keys = set(document) | set(culprit) | set(culprit["example"]) | set(culprit["example"]["stack"][0])
    missing = [key for key in keys if f'"{key}"' not in (module.__doc__ or "")]
    assert not missing


# ---- HTML ----------------------------------------------------------------------------------------

NASTY = "<script>alert('x')</script>&\"q\".f"


def test_html_page_is_self_contained_escaped_and_draws_one_bar_per_episode(tmp_path: Path) -> None:
    episodes = [*KNOWN, episode(NASTY, 25.0, T0 + 7.0, context={"request_id": "<r&1>"})]
    path = write_recording(tmp_path / "known.lwrec", episodes)
    out = tmp_path / "page.html"
    result = report(str(path), "--html", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"loopwatch: wrote {out} (8 episodes, 4 culprits)\n"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2  # timeline and chart
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"\b(src|href)=|@import|url\(", page)  # nothing fetched when viewed
    assert "<script" not in page  # the culprit named <script> is text, not code
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;q&quot;.f" in page
    assert "request_id=&lt;r&amp;1&gt;" in page  # the hover title names the request
    assert page.count('class="ep"') == len(episodes)
    assert page.count("<details") == 4 and "app.a blocked the event loop for 40.0 ms" in page


def test_html_shows_a_deep_stack_whole_on_request_and_times_one_way() -> None:
    deep = episode("app.deep", 1204.9, frames=30)
    page = render_html(summarize(recording([deep, episode("app.shallow", 20.0)])))
    # The cut stack says how much more there is; one click shows every frame.
    assert page.count("... ") >= 1 and page.count('<details class="whole">') == 1
    assert "<summary>all 31 frames</summary>" in page
    assert "/srv/app/layer0.py:10 in app.layer0.handle (coroutine)" in page  # the outermost, cut above
    # Times in ms read the same in the table as in the stacks: no thousands separator in one only.
    assert ">1204.9<" in page and "1,204.9" not in page


def test_html_with_json_keeps_stdout_to_the_document(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "known.lwrec", KNOWN)
    out = tmp_path / "page.html"
    result = report(str(path), "--json", "--html", str(out))
    assert json.loads(result.stdout)["episodes"] == 7
    assert result.stderr == f"loopwatch: wrote {out} (7 episodes, 3 culprits)\n"
    assert out.exists()


def test_html_of_an_empty_recording_says_so(tmp_path: Path) -> None:
    path = tmp_path / "empty.lwrec"
    open_recorder(path, truncate=True)
    out = tmp_path / "page.html"
    assert report(str(path), "--html", str(out)).returncode == 0
    page = out.read_text(encoding="utf-8")
    assert "No episodes" in page and "<svg" not in page


def test_html_of_one_episode_draws_one_visible_bar() -> None:
    page = render_html(summarize(recording([episode("time.sleep", 50.0)])))
    bars = re.findall(r'<rect class="ep" x="[^"]+" y="[^"]+" width="([^"]+)"', page)
    assert len(bars) == 1 and float(bars[0]) > 100  # the episode spans the timeline, not a dot


def test_html_of_100k_episodes_merges_bars_and_says_so() -> None:
    many = [
        episode(f"app.f{i % 25}", 5.0 + i % 50, T0 + i * 0.07, thread_id=1 + i % 2, frames=0)
        for i in range(100_000)
    ]
    started = time.perf_counter()
    page = render_html(summarize(recording(many)))
    elapsed = time.perf_counter() - started
    drawn = page.count('class="ep')
    assert len(many) > MAX_BARS and 0 < drawn <= MAX_BARS * 2
    assert "100,000 episodes are too many to draw one by one" in page
    assert len(page) < 5_000_000
    assert elapsed < 30  # generous for a shared machine; it is about 1 s


def test_html_is_written_atomically_over_an_old_page(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "known.lwrec", KNOWN)
    out = tmp_path / "page.html"
    out.write_text("old page")
    out.chmod(0o640)
    assert report(str(path), "--html", str(out)).returncode == 0
    assert "app.a" in out.read_text(encoding="utf-8")
    assert out.stat().st_mode & 0o777 == 0o640  # the old page's permissions are kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["known.lwrec", "page.html"]  # no temp left


def test_html_to_a_missing_directory_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "known.lwrec", KNOWN)
    line = assert_one_line_error(report(str(path), "--html", str(tmp_path / "no" / "page.html")))
    assert "cannot write" in line and "page.html" in line


def test_html_never_overwrites_the_recording(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "known.lwrec", KNOWN)
    before = path.read_bytes()
    assert "would overwrite the recording" in assert_one_line_error(report(str(path), "--html", str(path)))
    assert path.read_bytes() == before


# ---- errors, usage, pipes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "No such file"),
        (b"", "not a loopwatch recording"),
        (b"hello, I am a text file\n", "not a loopwatch recording"),
        (b"\xb3loopwatch-recor", "not a loopwatch recording"),  # the header cut short
        (b"\xb3loopwatch-recording\x63", "newer than this loopwatch reads"),
    ],
    ids=["missing", "empty", "foreign", "damaged-header", "future-version"],
)
def test_a_file_that_is_no_recording_is_a_one_line_error(
    tmp_path: Path, content: Optional[bytes], says: str
) -> None:
    path = tmp_path / "x.lwrec"
    if content is not None:
        path.write_bytes(content)
    result = report(str(path))
    assert says in assert_one_line_error(result)
    assert result.stdout == ""


def test_a_directory_is_a_one_line_error(tmp_path: Path) -> None:
    assert "directory" in assert_one_line_error(report(str(tmp_path)))


def test_a_cut_short_recording_is_reported_then_fails_like_zcat(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "known.lwrec", KNOWN)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])  # the last episode's record loses its end
    result = report(str(path))
    line = assert_one_line_error(result)
    assert "cut short" in line and "read 6 episodes" in line
    assert "6 episodes" in result.stdout.splitlines()[1]  # what came before is still reported
    as_json = report(str(path), "--json")
    assert as_json.returncode == 1 and "cut short" in json.loads(as_json.stdout)["problem"]


@pytest.mark.parametrize("args", [["--top", "0"], ["--top", "-3"], ["--top", "many"], [], ["--colour"]])
def test_bad_usage_exits_2_with_usage_and_no_traceback(tmp_path: Path, args: list[str]) -> None:
    path = write_recording(tmp_path / "known.lwrec", KNOWN)
    result = report(*([str(path)] if args != [] else []), *args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: loopwatch")
    assert "Traceback" not in result.stderr and result.stdout == ""
    if args[:1] == ["--top"]:
        assert f"argument --top: must be a whole number >= 1, got '{args[1]}'" in result.stderr


def test_help_and_version_follow_the_conventions() -> None:
    helped = report("--help")
    assert helped.returncode == 0 and "usage: loopwatch report" in helped.stdout
    assert "--json" in helped.stdout and "--html OUT" in helped.stdout and "--top N" in helped.stdout
    version = subprocess.run([sys.executable, "-m", "loopwatch", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("loopwatch ")


@pytest.fixture(scope="module")
def long_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recording whose report (400 culprits with their stacks) is far bigger than a pipe holds."""
    path = tmp_path_factory.mktemp("long") / "many.lwrec"
    return write_recording(path, [episode(f"app.culprit{i}", 10.0 + i, T0 + i, frames=5) for i in range(400)])


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_a_reader_gone_before_the_output_is_no_traceback(long_report: Path, flags: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails
    try:
        result = report(str(long_report), "--top", "400", *flags, stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert result.stderr == ""


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_a_reader_that_stops_after_one_line_is_no_traceback(long_report: Path, flags: list[str]) -> None:
    """What `loopwatch report f | head -1` does: the first write is taken in part, the next fails.
    The part must not be taken for the whole (PYTHONUNBUFFERED makes stdout write straight through)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "loopwatch", "report", str(long_report), "--top", "400", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()
    status = process.wait(timeout=120)
    assert first.startswith(b"{" if flags else b"loopwatch report:")
    assert status == 1
    assert process.stderr.read() == b""


# ---- progress on a terminal --------------------------------------------------------------------


def run_with_terminal_stderr(*args: str) -> tuple[int, str, str]:
    """Runs the command with stderr on a real pseudo-terminal; returns (status, stdout, terminal)."""
    import pty

    controller, terminal = pty.openpty()
    env = dict(os.environ, TZ="UTC", TERM="xterm")
    process = subprocess.Popen(
        [sys.executable, "-m", "loopwatch", "report", *args],
        stdout=subprocess.PIPE,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    stdout, _ = process.communicate(timeout=120)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the terminal's last holder has exited
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    return process.returncode, stdout.decode(), seen.decode()


@pytest.fixture(scope="module")
def big_recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.lwrec"
    many = [episode(f"app.f{i % 7}", 10.0 + i % 40, T0 + i * 0.1, frames=6) for i in range(3000)]
    write_recording(path, many)
    assert path.stat().st_size > PROGRESS_FROM_BYTES
    return path


def test_a_big_file_shows_one_progress_line_on_a_terminal_then_erases_it(big_recording: Path) -> None:
    status, stdout, terminal = run_with_terminal_stderr(str(big_recording))
    assert status == 0
    assert terminal.startswith("\rloopwatch: reading 0%")
    assert "loopwatch: reading 100%" in terminal
    assert "loopwatch: rendering 3,000 episodes" in terminal
    assert terminal.endswith(ANSI_CLEAR_LINE)  # nothing is left on the line when done
    assert "\n" not in terminal  # one updating line, never a scrolling log
    assert stdout.startswith("loopwatch report:") and "3,000 episodes" in stdout


def test_no_progress_in_a_pipe_or_for_a_small_file(big_recording: Path, tmp_path: Path) -> None:
    piped = report(str(big_recording))
    assert piped.returncode == 0 and piped.stderr == ""
    small = write_recording(tmp_path / "small.lwrec", KNOWN)
    status, _, terminal = run_with_terminal_stderr(str(small))
    assert status == 0 and terminal == ""


# ---- the whole path: a monitored program, its recording, the report ------------------------------


def test_a_recorded_program_is_reported_end_to_end(tmp_path: Path) -> None:
    program = tmp_path / "service.py"
    program.write_text(
        textwrap.dedent(
            """
            import asyncio, sys, time
            from loopwatch import EventLoopMonitor

            def slow_query():
                time.sleep(0.06)

            async def handle(i):
                await asyncio.sleep(0.01 * i)
                slow_query()

            async def main():
                with EventLoopMonitor(threshold_ms=30, record_to=sys.argv[1],
                                      on_blocking_call=lambda info: None):
                    await asyncio.gather(*(handle(i) for i in range(3)))

            asyncio.run(main())
            """
        )
    )
    path = tmp_path / "service.lwrec"
    subprocess.run([sys.executable, str(program), str(path)], check=True, timeout=60)
    document = json.loads(report(str(path), "--json").stdout)
    assert document["episodes"] == 3 and document["processes"] == 1
    worst = document["culprits"][0]
    assert (worst["culprit"], worst["count"], worst["is_c_call"]) == ("time.sleep", 3, True)
    assert worst["p50_ms"] >= 55
    assert [f["name"] for f in worst["example"]["stack"]][-2:] == ["__main__.slow_query", "time.sleep"]
    # The user's line: the call of time.sleep in slow_query, made directly, not via a library.
    line = program.read_text().splitlines().index("    time.sleep(0.06)") + 1
    assert (worst["example"]["where"], worst["example"]["via"]) == (
        f"{program}:{line} in __main__.slow_query",
        None,
    )
    out = tmp_path / "service.html"
    assert report(str(path), "--html", str(out)).returncode == 0
    assert out.read_text(encoding="utf-8").count('class="ep"') == 3
