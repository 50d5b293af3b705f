"""Recorded sessions: every report reaches the file, a crash or a kill leaves a readable file, and
a damaged, cut or foreign file is read as far as it can be, or refused in one line."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import BLOCK_S, THRESHOLD_MS, items_summed_in, monitor
from loopwatch import BlockingCallInfo, RecordingError, monitor_current_task, read_recording

FILE_START = b"\xb3loopwatch-recording\x01"


# A C call holding the GIL, well over the threshold on any interpreter (30 ms on 3.11 at 3,000,000
# items here: as often under the threshold as over).
SUMMED = items_summed_in(3 * THRESHOLD_MS / 1000)


async def block_three_ways() -> None:
    time.sleep(BLOCK_S)
    await asyncio.sleep(0)
    sum(range(SUMMED))
    await asyncio.sleep(0)
    time.sleep(BLOCK_S)
    await asyncio.sleep(0)


def record_three_episodes(run, path: Path) -> list[BlockingCallInfo]:
    """Runs `block_three_ways` monitored, recording to `path`; the reports delivered. Without
    reports of stalls while they run (their records are tested in test_stalls.py)."""
    ctx, reports = monitor(record_to=path, reports_per_minute=None, report_stalls=False)

    async def main() -> None:
        with ctx:
            await block_three_ways()

    run(main)
    return reports


def test_every_report_reads_back_exactly_as_delivered(run, tmp_path: Path) -> None:
    path = tmp_path / "session.lwrec"
    reports = record_three_episodes(run, path)
    recording = read_recording(path)
    assert recording.problem is None
    assert len(reports) == 3
    assert list(recording.episodes) == reports
    [session] = recording.sessions
    assert session.process_id == os.getpid()
    assert session.argv == tuple(sys.argv)


def test_a_summary_read_keeps_only_each_culprits_longest_stack(run, tmp_path: Path) -> None:
    path = tmp_path / "session.lwrec"
    reports = record_three_episodes(run, path)
    reports += record_three_episodes(run, path)
    light = read_recording(path, stacks="worst").episodes
    assert [dataclasses.replace(e, stack=()) for e in light] == [
        dataclasses.replace(r, stack=()) for r in reports
    ]
    for culprit in {r.method_name for r in reports}:
        theirs = [r for r in reports if r.method_name == culprit]
        longest = max(theirs, key=lambda r: r.duration_ms)
        kept = [e for e in light if e.method_name == culprit and e.stack]
        assert kept == [longest]
    with pytest.raises(ValueError, match="stacks must be"):
        read_recording(path, stacks="some")  # type: ignore[arg-type]


def test_the_rate_limit_holds_back_reports_but_not_records(run, tmp_path: Path) -> None:
    path = tmp_path / "session.lwrec"
    ctx, reports = monitor(record_to=str(path), reports_per_minute=1)

    async def main() -> None:
        with ctx:
            for _ in range(3):
                time.sleep(BLOCK_S)
                await asyncio.sleep(0)

    run(main)
    assert [r.method_name for r in reports] == ["time.sleep"]
    assert [e.method_name for e in read_recording(path).episodes] == ["time.sleep"] * 3


def test_a_request_scope_records_its_context(tmp_path: Path) -> None:
    path = tmp_path / "requests.lwrec"

    async def handle(request_id: str) -> None:
        with monitor_current_task(
            threshold_ms=THRESHOLD_MS,
            on_blocking_call=lambda info: None,
            context={"request_id": request_id, "path": "/items"},
            record_to=path,
        ):
            time.sleep(BLOCK_S)
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(handle("r1"), handle("r2"))

    asyncio.run(main())
    contexts = sorted(dict(e.context or {})["request_id"] for e in read_recording(path).episodes)
    assert contexts == ["r1", "r2"]


def test_a_recording_is_added_to_not_overwritten(run, tmp_path: Path) -> None:
    path = tmp_path / "session.lwrec"
    for _ in range(2):
        ctx, _ = monitor(record_to=path)

        async def main(ctx=ctx) -> None:
            with ctx:
                time.sleep(BLOCK_S)
                await asyncio.sleep(0)

        run(main)
    assert len(read_recording(path).episodes) == 2


def test_a_killed_program_leaves_every_record_it_wrote_readable(tmp_path: Path) -> None:
    path = tmp_path / "killed.lwrec"
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from loopwatch import event_loop_monitor_ctx

        async def main():
            with event_loop_monitor_ctx(threshold_ms=5, record_to={str(path)!r},
                                        on_blocking_call=lambda info: None, reports_per_minute=None):
                while True:
                    time.sleep(0.006)
                    await asyncio.sleep(0)

        asyncio.run(main())
        """
    )
    program = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_size > 20_000:
                break
            time.sleep(0.05)
    finally:
        program.send_signal(signal.SIGKILL)
        program.wait()
    recording = read_recording(path)
    assert recording.problem is None, recording.problem
    # Each 6 ms step is an episode and, at 5 ms, a stall reported while it ran.
    assert len(recording.episodes) + len(recording.stalls) > 20
    assert {e.method_name for e in recording.episodes} == {"time.sleep"}
    assert {s.stack[0][1] for s in recording.stalls} == {"main"}
    assert recording.sessions[0].process_id == program.pid


def test_a_file_cut_inside_a_record_reads_up_to_the_last_whole_one(run, tmp_path: Path) -> None:
    path = tmp_path / "whole.lwrec"
    reports = record_three_episodes(run, path)
    data = path.read_bytes()
    last_record_start = data.rindex(b"\xc6\x00\x00")
    cut = tmp_path / "cut.lwrec"
    for end in (last_record_start + 1, last_record_start + 5, len(data) - 1):
        cut.write_bytes(data[:end])
        recording = read_recording(cut)
        assert list(recording.episodes) == reports[:2]
        assert recording.problem is not None
        assert "cut short" in recording.problem and "\n" not in recording.problem


def test_a_damaged_record_is_skipped_and_the_rest_read(run, tmp_path: Path) -> None:
    path = tmp_path / "damaged.lwrec"
    reports = record_three_episodes(run, path)
    data = bytearray(path.read_bytes())
    # Overwrite the inside of the second episode's record (the first record is the session).
    starts = [i for i in range(len(data) - 3) if data[i : i + 3] == b"\xc6\x00\x00"]
    second_episode = starts[2]
    data[second_episode + 6 : second_episode + 40] = b"\xc1" * 34
    path.write_bytes(bytes(data))
    recording = read_recording(path)
    assert [e.method_name for e in recording.episodes] == [reports[0].method_name, reports[2].method_name]
    assert recording.problem is not None and "damaged" in recording.problem


def test_threads_and_forked_processes_share_one_file_without_mixing_records(tmp_path: Path) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    path = tmp_path / "shared.lwrec"
    per_writer = 40
    # In a fresh interpreter, so that the fork happens while it has one thread only.
    script = textwrap.dedent(
        f"""
        import asyncio, os, threading, time
        from loopwatch import event_loop_monitor_ctx
        from loopwatch._recording import open_recorder

        delivered = []

        def record_episodes():
            async def main():
                with event_loop_monitor_ctx(threshold_ms=2, record_to={str(path)!r},
                                            on_blocking_call=delivered.append,
                                            reports_per_minute=None):
                    for _ in range({per_writer}):
                        time.sleep(0.005)
                        await asyncio.sleep(0)
            asyncio.run(main())

        open_recorder({str(path)!r})  # before the fork: the child inherits the open recorder
        child = os.fork()
        if child == 0:
            record_episodes()
            os._exit(len(delivered))
        threads = [threading.Thread(target=record_episodes) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        child_delivered = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        print(os.getpid(), child, len(delivered), child_delivered)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    parent, child, parent_delivered, child_delivered = (int(n) for n in done.stdout.split())
    recording = read_recording(path)
    assert recording.problem is None
    # Every report delivered is in the file once, whichever thread or process made it. (A step
    # starved of CPU on a loaded machine is no report, so the count itself may fall a little short.)
    assert sum(e.process_id == parent for e in recording.episodes) == parent_delivered
    assert sum(e.process_id == child for e in recording.episodes) == child_delivered
    assert parent_delivered >= 3 * per_writer * 0.9 and child_delivered >= per_writer * 0.9
    assert {s.process_id for s in recording.sessions} == {parent, child}
    assert len({e.thread_id for e in recording.episodes if e.process_id == parent}) == 3


def test_the_file_is_a_plain_messagepack_stream(run, tmp_path: Path) -> None:
    msgpack = pytest.importorskip("msgpack")
    path = tmp_path / "session.lwrec"
    reports = record_three_episodes(run, path)
    values = list(msgpack.Unpacker(io.BytesIO(path.read_bytes()), raw=False))
    assert values[:2] == ["loopwatch-recording", 1]
    records = [msgpack.unpackb(frame, raw=False) for frame in values[2:]]
    assert [r["type"] for r in records] == ["session", "episode", "episode", "episode"]
    assert [r["method_name"] for r in records[1:]] == [r.method_name for r in reports]
    assert records[1]["duration_ms"] == reports[0].duration_ms


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        (b"", "not a loopwatch recording"),
        (b"PK\x03\x04 a zip archive, say", "not a loopwatch recording"),
        (FILE_START[:-1] + b"\x07", "format version 7"),
    ],
)
def test_a_missing_or_foreign_file_is_refused_in_one_line(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "file.lwrec"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RecordingError) as error:
        read_recording(path)
    assert message in str(error.value)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="directory"):
        read_recording(tmp_path)


def test_recording_refuses_to_add_to_a_file_that_is_no_recording(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n")
    with pytest.raises(RecordingError, match="not adding to it"):
        monitor(record_to=path)
    assert path.read_text() == "my notes\n"
    with pytest.raises(RecordingError, match="cannot record to"):
        monitor(record_to=tmp_path / "missing-dir" / "x.lwrec")
    with pytest.raises(TypeError, match="record_to must be a file path"):
        monitor(record_to=3)


def test_a_full_disk_is_logged_once_and_never_reaches_the_program(tmp_path: Path) -> None:
    path = tmp_path / "full.lwrec"
    # The file size limit makes writes past 3,000 bytes fail as on a full disk (EFBIG).
    script = textwrap.dedent(
        f"""
        import asyncio, resource, signal, time
        from loopwatch import event_loop_monitor_ctx

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
        reports = []

        async def main():
            with event_loop_monitor_ctx(threshold_ms=20, record_to={str(path)!r},
                                        on_blocking_call=reports.append, reports_per_minute=None):
                for _ in range(10):
                    time.sleep(0.03)
                    await asyncio.sleep(0)

        asyncio.run(main())
        print(len(reports), "reports")
        """
    )
    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("needs RLIMIT_FSIZE")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "10 reports"
    assert done.stderr.count("could not add to the recording") == 1, done.stderr
    assert "Traceback" not in done.stderr
    recording = read_recording(path)
    assert 0 < len(recording.episodes) < 10 and recording.problem is None


def test_the_reader_survives_any_damage(run, tmp_path: Path) -> None:
    """A few hundred random cuts, flips and splices of a real recording: the reader returns what it
    can or raises RecordingError, and whatever it returns is a well-formed report."""
    path = tmp_path / "session.lwrec"
    record_three_episodes(run, path)
    data = path.read_bytes()
    rng = random.Random(1234)
    mutated = tmp_path / "mutated.lwrec"
    for _ in range(300):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            if not damaged:
                break
            choice = rng.random()
            at = rng.randrange(len(damaged))
            if choice < 0.4:
                damaged[at] = rng.randrange(256)
            elif choice < 0.6:
                del damaged[at : at + rng.randint(1, 50)]
            elif choice < 0.8:
                damaged[at:at] = rng.randbytes(rng.randint(1, 20)) if hasattr(rng, "randbytes") else b"\x00"
            else:
                damaged = damaged[:at]
        mutated.write_bytes(bytes(damaged))
        try:
            recording = read_recording(mutated)
        except RecordingError as error:
            assert "\n" not in str(error)
            continue
        for episode in recording.episodes:
            assert episode.duration_ms >= 0 and episode.format()
