"""The page ``loopwatch report --html`` writes: one self-contained file (inline CSS and SVG, no script,
nothing fetched) with a timeline of the episodes, a chart of the worst culprits and their stacks."""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from loopwatch._report import BlockingCallInfo
from loopwatch._reporting import (
    DEFAULT_TOP,
    STACK_FRAMES,
    CulpritStats,
    Summary,
    describe_session,
    format_blocked,
    format_span,
    local_time,
    one_line,
    plural,
    shorten,
    time_range,
)

__all__ = ["MAX_BARS", "render_html"]

MAX_BARS = 5000
"""Above this many episodes the timeline merges them per lane and pixel column: a browser stays
quick with a few thousand SVG elements, not with a hundred thousand."""

PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#86bcb6",
)
OTHER = "#b5bac2"

WIDTH = 1200  # SVG user units; the page scales the drawings to its width
LABEL_WIDTH = 150
LANE_HEIGHT = 26
BAR_HEIGHT = 16
AXIS_HEIGHT = 26
MIN_BAR_WIDTH = 2.0  # a 1 ms episode in an hour-long recording is still a visible mark

CSS = """
:root { --fg: #1f2328; --muted: #5b636e; --line: #d8dee4; --soft: #f4f6f8; --accent: #4e79a7; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 24px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; font-weight: 600; }
h1 .file { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 18px;
  font-weight: 500; color: var(--muted); margin-left: 6px; }
h2 { font-size: 16px; margin: 32px 0 8px; font-weight: 600; }
.facts { display: flex; flex-wrap: wrap; gap: 8px 28px; margin: 14px 0 6px; padding: 0; list-style: none; }
.facts li { display: flex; flex-direction: column; }
.facts b { font-size: 20px; font-weight: 600; }
.facts span { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.sessions { color: var(--muted); font-size: 12.5px; margin: 6px 0 0; padding: 0; list-style: none; }
.sessions li { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.note { color: var(--muted); font-size: 12.5px; margin: 6px 0 0; }
.note.lead { margin: 0 0 6px; }
.problem { background: #fff4e5; border: 1px solid #f0b35b; border-radius: 6px; padding: 10px 14px;
  margin: 16px 0; }
.empty { background: var(--soft); border-radius: 6px; padding: 28px; text-align: center;
  color: var(--muted); margin: 24px 0; font-size: 15px; }
svg { display: block; width: 100%; height: auto; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: var(--fg); }
svg .lane-label, svg .tick { fill: var(--muted); font-size: 12px; }
svg .lane { fill: var(--soft); }
svg .grid { stroke: var(--line); stroke-width: 1; }
svg .ep { stroke: #fff; stroke-width: .6; }  /* back-to-back episodes stay apart */
svg .ep.merged { stroke: none; }
svg .ep:hover, svg .bar:hover { stroke: var(--fg); stroke-width: 1; }
svg .name { font-size: 13px; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
svg .total { font-size: 13px; font-weight: 600; }
svg .stats { fill: var(--muted); font-size: 11.5px; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 10px 0 0; padding: 0; list-style: none;
  font-size: 12.5px; }
.legend li { display: flex; align-items: center; gap: 6px; max-width: 100%; }
.legend code { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; flex: none; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.culprits { border: 1px solid var(--line); border-radius: 6px; overflow: hidden; }
.row { display: grid; grid-template-columns: 36px minmax(0, 1fr) 64px 88px 64px 70px 70px 70px;
  gap: 10px; align-items: center; padding: 7px 12px; }
.row > .num { text-align: right; font-variant-numeric: tabular-nums; }
.head { background: var(--soft); color: var(--muted); font-size: 12px; font-weight: 600; }
details { border-top: 1px solid var(--line); }
summary { cursor: pointer; list-style: none; }
summary::-webkit-details-marker { display: none; }
summary:hover { background: #f8fafc; }
summary .culprit { display: flex; align-items: center; gap: 8px; min-width: 0; }
summary .culprit code { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; font-size: 13px; }
.twisty { color: var(--muted); font-size: 10px; transition: transform .1s; flex: none; }
details[open] .twisty { transform: rotate(90deg); }
.kinds { color: var(--muted); font-size: 12px; flex: none; }
pre { margin: 0; padding: 10px 14px 14px 58px; overflow-x: auto; background: #fbfcfd;
  border-top: 1px dashed var(--line); line-height: 1.5; }
details.whole { border-top: 1px dashed var(--line); }
details.whole > summary { padding: 6px 14px 6px 58px; color: var(--accent); font-size: 12px; }
footer { margin-top: 32px; color: var(--muted); font-size: 12px; }
"""


def _e(text: object) -> str:
    """Escaped for HTML text and attribute values alike (quotes included)."""
    return html.escape(str(text), quote=True)


def _n(value: float) -> str:
    """An SVG coordinate: short, and never 'nan' from a damaged file."""
    return f"{value:.1f}" if math.isfinite(value) else "0"


def render_html(summary: Summary, top: int = DEFAULT_TOP) -> str:
    recording = summary.recording
    shown = summary.culprits[:top]
    colors = {c.culprit: PALETTE[i] for i, c in enumerate(summary.culprits[: min(top, len(PALETTE))])}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>loopwatch report: {_e(recording.path)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f'<h1>loopwatch report<span class="file">{_e(recording.path)}</span></h1>',
        _facts(summary),
    ]
    if recording.problem:
        parts.append(
            '<p class="problem"><b>This recording is cut short or damaged:</b> '
            f"{_e(recording.problem)}. The report shows what could be read.</p>"
        )
    if not recording.episodes:
        parts.append(
            '<p class="empty">No episodes: nothing blocked the event loop past the threshold '
            "while this recording was made.</p>"
        )
    else:
        parts += ["<h2>Timeline</h2>", _timeline(summary, colors), _legend(summary, colors)]
        parts += [f"<h2>Worst culprits{_of(len(shown), len(summary.culprits))}</h2>", _chart(shown, colors)]
        parts += [
            "<h2>Culprits and the stack of each one's worst episode</h2>",
            _table(shown, colors),
        ]
    parts.append(
        f"<footer>Percentiles are nearest-rank: p99 is the shortest duration that 99% of the "
        f"culprit's episodes did not exceed. Times are local ({_e(time.strftime('%Z'))}). "
        f"Made by loopwatch on {_e(local_time(time.time(), with_date=True))}.</footer>"
    )
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _of(shown: int, total: int) -> str:
    return f" (top {shown} of {total})" if shown < total else ""


def _facts(summary: Summary) -> str:
    recording = summary.recording
    facts = [
        (format_blocked(summary.blocked_ms), "blocked in total"),
        (f"{len(recording.episodes):,}", "episodes"),
        (f"{len(summary.culprits):,}", "culprits"),
        (f"{len(summary.process_ids):,}", "processes" if len(summary.process_ids) != 1 else "process"),
    ]
    if summary.first_at is not None and summary.last_at is not None:
        facts.append((format_span(summary.last_at - summary.first_at), "from first to last"))
    items = "".join(f"<li><b>{_e(value)}</b><span>{_e(label)}</span></li>" for value, label in facts)
    out = f'<ul class="facts">{items}</ul>'
    if summary.first_at is not None:
        out += f'<p class="note">{_e(time_range(summary))}</p>'
    sessions = "".join(
        f"<li>{_e(describe_session(s))}, loopwatch {_e(s.loopwatch_version)}</li>"
        for s in recording.sessions[:5]
    )
    if len(recording.sessions) > 5:
        sessions += f"<li>... and {len(recording.sessions) - 5} more processes</li>"
    return out + (f'<ul class="sessions">{sessions}</ul>' if sessions else "")


# ---- timeline ------------------------------------------------------------------------------------


@dataclass
class _Column:
    """The episodes of one lane that fall into one pixel column (the merged timeline)."""

    count: int = 0
    blocked_ms: float = 0.0
    by_culprit: dict[str, float] = field(default_factory=dict)
    worst: Optional[BlockingCallInfo] = None


def _lanes(episodes: Iterable[BlockingCallInfo]) -> dict[tuple[int, int], str]:
    """A lane per (process, thread), in order of process id then first episode; with its label."""
    threads: dict[int, list[int]] = {}
    for info in episodes:
        seen = threads.setdefault(info.process_id, [])
        if info.thread_id not in seen:
            seen.append(info.thread_id)
    lanes = {}
    for pid in sorted(threads):
        for number, thread in enumerate(threads[pid], 1):
            lanes[(pid, thread)] = f"pid {pid}" + (f" · thread {number}" if len(threads[pid]) > 1 else "")
    return lanes


def _tick_step(span: float) -> float:
    steps = [m * 10.0**e for e in range(-3, 2) for m in (1, 2, 5)] + [
        15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
    ]  # fmt: skip
    return next((s for s in sorted(steps) if span / s <= 8), 86400 * math.ceil(span / 86400 / 8))


def _hover(info: BlockingCallInfo, first_at: float) -> str:
    lines = [
        f"{one_line(info.method_name)}: {info.duration_ms:.1f} ms",
        f"at {local_time(info.timestamp, millis=True)} (+{info.timestamp - first_at:.3f} s)",
    ]
    if info.task_name:
        lines.append(f"task {one_line(info.task_name)!r}")
    if info.context:
        lines.append(one_line(", ".join(f"{k}={v}" for k, v in info.context.items())))
    if info.kind != "call":
        lines.append(f"kind: {info.kind}")
    return "\n".join(lines)


def _timeline(summary: Summary, colors: dict[str, str]) -> str:
    episodes = [
        info
        for info in summary.recording.episodes
        if math.isfinite(info.timestamp) and math.isfinite(info.duration_ms)
    ]
    assert summary.first_at is not None and summary.last_at is not None
    lanes = _lanes(episodes)
    lane_index = {key: i for i, key in enumerate(lanes)}
    plot_width = WIDTH - LABEL_WIDTH - 12
    span = max(summary.last_at - summary.first_at, 0.001)
    start = summary.first_at - span * 0.01  # a little air so the first and last bars show whole
    scale = plot_width / (span * 1.02)
    height = AXIS_HEIGHT + LANE_HEIGHT * len(lanes) + 4

    def x(at: float) -> float:
        return LABEL_WIDTH + (at - start) * scale

    merged = len(episodes) > MAX_BARS
    seconds_per_column = 1 / scale
    if merged:
        note = (
            f"{len(episodes):,} episodes are too many to draw one by one: each bar merges the episodes "
            f"of one lane within {format_span(seconds_per_column)} and takes the color of the culprit "
            "with the most blocked time there. Hover a bar for what it holds."
        )
    else:
        note = (
            "One lane per thread of each process; each bar is an episode, as wide as it lasted (at "
            "least a hairline). Hover a bar for its culprit, duration, time, task and request."
        )
    out = [
        f'<p class="note lead">{_e(note)}</p>',
        f'<svg viewBox="0 0 {WIDTH} {height}" role="img" aria-label="timeline of the episodes">',
    ]
    for i, label in enumerate(lanes.values()):
        y = AXIS_HEIGHT + i * LANE_HEIGHT
        out.append(
            f'<rect class="lane" x="{LABEL_WIDTH}" y="{y + 2}" width="{plot_width}" '
            f'height="{LANE_HEIGHT - 4}"/>'
            f'<text class="lane-label" x="{LABEL_WIDTH - 10}" y="{y + LANE_HEIGHT / 2 + 4}" '
            f'text-anchor="end">{_e(label)}</text>'
        )
    step = _tick_step(span)
    digits = 0 if step >= 1 else 1 if step >= 0.1 else 2 if step >= 0.01 else 3
    index = math.ceil(start / step)
    while index * step <= start + span * 1.02:
        tick = index * step  # a multiple, not a running sum: no drift into 12:00:00.999
        tx = x(tick)
        # The last label would stick out past the drawing: anchor it by its end.
        anchor = "end" if tx > WIDTH - 50 else "middle"
        out.append(
            f'<line class="grid" x1="{_n(tx)}" y1="{AXIS_HEIGHT - 6}" x2="{_n(tx)}" y2="{height - 4}"/>'
            f'<text class="tick" x="{_n(tx)}" y="{AXIS_HEIGHT - 10}" text-anchor="{anchor}">'
            f"{_e(local_time(tick, millis=digits > 0, digits=digits))}</text>"
        )
        index += 1

    if not merged:
        for info in episodes:
            y = AXIS_HEIGHT + lane_index[(info.process_id, info.thread_id)] * LANE_HEIGHT
            left = x(info.timestamp)
            width = max(info.duration_ms / 1000 * scale, MIN_BAR_WIDTH)
            out.append(
                f'<rect class="ep" x="{_n(left)}" y="{y + (LANE_HEIGHT - BAR_HEIGHT) / 2}" '
                f'width="{_n(width)}" height="{BAR_HEIGHT}" rx="1" '
                f'fill="{colors.get(info.method_name, OTHER)}"><title>'
                f"{_e(_hover(info, summary.first_at))}</title></rect>"
            )
        out.append("</svg>")
        return "\n".join(out)

    columns: dict[tuple[int, int], _Column] = {}
    for info in episodes:
        lane = lane_index[(info.process_id, info.thread_id)]
        first = int(x(info.timestamp) - LABEL_WIDTH)
        last = int(x(info.timestamp + info.duration_ms / 1000) - LABEL_WIDTH)
        for column_at in range(max(first, 0), min(last, plot_width - 1) + 1):
            column = columns.setdefault((lane, column_at), _Column())
            column.count += 1
            # Shares: a step with several culprits is counted once across their reports.
            column.blocked_ms += info.blamed_ms
            column.by_culprit[info.method_name] = (
                column.by_culprit.get(info.method_name, 0.0) + info.blamed_ms
            )
            if column.worst is None or info.blamed_ms > column.worst.blamed_ms:
                column.worst = info
    for (lane, column_at), column in sorted(columns.items()):
        most = max(column.by_culprit.items(), key=lambda item: item[1])[0]
        assert column.worst is not None
        left = start + column_at * seconds_per_column
        hover = (
            f"{plural(column.count, 'episode')}, {column.blocked_ms:.1f} ms blocked\n"
            f"{local_time(left, millis=True)} to {local_time(left + seconds_per_column, millis=True)}\n"
            f"most blocked time: {one_line(most)}\n"
            f"worst: {_hover(column.worst, summary.first_at)}"
        )
        y = AXIS_HEIGHT + lane * LANE_HEIGHT
        out.append(
            f'<rect class="ep merged" x="{LABEL_WIDTH + column_at}" y="{y + (LANE_HEIGHT - BAR_HEIGHT) / 2}" '
            f'width="1" height="{BAR_HEIGHT}" fill="{colors.get(most, OTHER)}">'
            f"<title>{_e(hover)}</title></rect>"
        )
    out.append("</svg>")
    return "\n".join(out)


def _legend(summary: Summary, colors: dict[str, str]) -> str:
    items = [
        f'<li><span class="swatch" style="background:{color}"></span><code title="{_e(name)}">'
        f"{_e(shorten(name, 60))}</code></li>"
        for name, color in colors.items()
    ]
    if len(summary.culprits) > len(colors):
        others = len(summary.culprits) - len(colors)
        items.append(
            f'<li><span class="swatch" style="background:{OTHER}"></span>'
            f"{_e(plural(others, 'other culprit'))}</li>"
        )
    return f'<ul class="legend">{"".join(items)}</ul>'


# ---- worst culprits ------------------------------------------------------------------------------


def _chart(shown: Sequence[CulpritStats], colors: dict[str, str]) -> str:
    row = 42
    name_width = 360
    bar_room = 520
    height = row * len(shown) + 6
    biggest = max((c.total_ms for c in shown), default=0.0) or 1.0
    out = [f'<svg viewBox="0 0 {WIDTH} {height}" role="img" aria-label="blocked time by culprit">']
    for i, c in enumerate(shown):
        y = 4 + i * row
        width = max(c.total_ms / biggest * bar_room, 1.0)
        stats = (
            f"{plural(c.count, 'episode')} · p50 {c.p50_ms:.1f} · p99 {c.p99_ms:.1f} · max {c.max_ms:.1f} ms"
        )
        out.append(
            f"<g><title>{_e(c.culprit)}\n{_e(format_blocked(c.total_ms))} blocked, {c.share:.1%} of all\n"
            f"{_e(stats)}</title>"
            f'<text class="name" x="{name_width - 12}" y="{y + 15}" text-anchor="end">'
            f"{_e(shorten(c.culprit, 44))}</text>"
            f'<rect class="bar" x="{name_width}" y="{y + 3}" width="{_n(width)}" height="16" rx="2" '
            f'fill="{colors.get(c.culprit, OTHER)}"/>'
            f'<text class="total" x="{_n(name_width + width + 8)}" y="{y + 16}">'
            f'{_e(format_blocked(c.total_ms))} <tspan class="stats">({c.share:.1%})</tspan></text>'
            f'<text class="stats" x="{name_width}" y="{y + 35}">{_e(stats)}</text></g>'
        )
    out.append("</svg>")
    return "\n".join(out)


def _table(shown: Sequence[CulpritStats], colors: dict[str, str]) -> str:
    out = [
        '<div class="culprits"><div class="row head"><span class="num">#</span><span>culprit '
        "(click for the stack of its worst episode)</span>"
        '<span class="num">count</span><span class="num">total ms</span><span class="num">share</span>'
        '<span class="num">p50 ms</span><span class="num">p99 ms</span><span class="num">max ms</span></div>'
    ]
    for rank, c in enumerate(shown, 1):
        worst = c.worst
        kinds = ", ".join(plural(n, kind) for kind, n in c.kinds.items() if kind != "call")
        header = (
            f"worst: {worst.duration_ms:.1f} ms at {local_time(worst.timestamp, with_date=True, millis=True)}"
            f", pid {worst.process_id}"
        )
        stack = worst.format(max_frames=STACK_FRAMES * 2)
        whole = worst.format()
        # A deep stack is cut for reading; the whole of it is one click away, never lost.
        rest = (
            f'<details class="whole"><summary>all {len(worst.stack)} frames</summary>'
            f"<pre>{_e(whole)}</pre></details>"
            if whole != stack
            else ""
        )
        out.append(
            # The worst culprit's stack starts open: it is what a reader came for.
            f'<details{" open" if rank == 1 else ""}><summary class="row"><span class="num">{rank}</span>'
            f'<span class="culprit"><span class="twisty">&#9654;</span>'
            f'<span class="swatch" style="background:{colors.get(c.culprit, OTHER)}"></span>'
            f'<code title="{_e(c.culprit)}">{_e(c.culprit)}</code>'
            + (f'<span class="kinds">{_e(kinds)}</span>' if kinds else "")
            + "</span>"
            f'<span class="num">{c.count:,}</span><span class="num">{c.total_ms:.1f}</span>'
            f'<span class="num">{c.share:.1%}</span><span class="num">{c.p50_ms:.1f}</span>'
            f'<span class="num">{c.p99_ms:.1f}</span><span class="num">{c.max_ms:.1f}</span></summary>'
            f"<pre>{_e(header)}\n{_e(stack)}</pre>{rest}</details>"
        )
    out.append("</div>")
    return "\n".join(out)
