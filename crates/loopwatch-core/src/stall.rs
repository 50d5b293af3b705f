//! Stalls reported while they happen: when a step that is still running is reported again, and
//! the line the watchdog writes for it (without Python, so it gets out even if the loop's thread
//! never gives the GIL back).

use std::fmt::Write as _;

use crate::linetable::Span;
use crate::tracker::Ticks;

/// How many times longer than the threshold each report of a running stall waits than the one
/// before: at 1x, 10x, 100x the threshold, and so on.
pub const STALL_REPORT_GROWTH: u64 = 10;

/// The most frames a line written for a running stall shows, innermost first.
pub const STALL_LINE_FRAMES: usize = 8;

/// How long a step must have run for its `report`-th report while running (0 = the first), in
/// ticks; saturates rather than overflows.
pub fn stall_report_due(threshold: Ticks, report: u32) -> Ticks {
    STALL_REPORT_GROWTH
        .checked_pow(report)
        .and_then(|factor| threshold.checked_mul(factor))
        .unwrap_or(Ticks::MAX)
}

/// What the watchdog remembers of one watched thread between two looks at it, and what it
/// decides at each: nothing to do, look again later, or report the running stall now.
#[derive(Clone, Copy, Debug, Default)]
pub struct StallTimer {
    /// The unit last seen: odd while one runs (see the binding's `Watch`).
    seq: u64,
    reports: u32,
    /// The thread's cumulative wait for a CPU when this stall was first seen (ns).
    cpu_wait_base: Option<u64>,
}

/// What to do about one watched thread after a look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Look {
    /// No unit runs.
    Idle,
    /// A unit runs, not yet due for a report: look again at this tick.
    Until(Ticks),
    /// Report it: it has run `so_far` ticks; this is its `number`-th report (from 1); the next
    /// is due at `next`.
    Report {
        so_far: Ticks,
        number: u32,
        next: Ticks,
    },
}

impl StallTimer {
    /// Whether the next `look` needs the thread's CPU wait (a file of the OS, read for nothing
    /// on most looks, since most steps end long before the threshold): its baseline, once a stall
    /// has run half the threshold, and again once it is due (what it waited meanwhile delays the
    /// report).
    pub fn needs_cpu_wait(&self, seq: u64, started: Ticks, now: Ticks, threshold: Ticks) -> bool {
        let ran = now.saturating_sub(started);
        let (fresh, reports) = if seq == self.seq {
            (self.cpu_wait_base.is_none(), self.reports)
        } else {
            (true, 0)
        };
        seq % 2 == 1
            && ((fresh && ran >= threshold / 2) || ran >= stall_report_due(threshold, reports))
    }

    /// The thread's CPU wait when this stall was first given one (see `needs_cpu_wait`): what it
    /// waited from then to the step's end is not the code's.
    pub fn cpu_wait_base(&self) -> Option<u64> {
        self.cpu_wait_base
    }

    /// Looks at a thread whose unit counter reads `seq` (odd: a unit runs, started at `started`).
    /// A stall is timed as the tracker times an episode: what the thread spent waiting for a CPU
    /// since the first look that was given its wait (`cpu_wait_ns`, cumulative, where the OS
    /// says; see `needs_cpu_wait`) is not the code's, so it delays the report rather than makes one.
    pub fn look(
        &mut self,
        seq: u64,
        started: Ticks,
        now: Ticks,
        threshold: Ticks,
        nanos_per_tick: f64,
        cpu_wait_ns: Option<u64>,
    ) -> Look {
        if seq != self.seq {
            *self = StallTimer {
                seq,
                reports: 0,
                cpu_wait_base: None,
            };
        }
        if seq % 2 == 0 {
            return Look::Idle;
        }
        if self.cpu_wait_base.is_none() {
            self.cpu_wait_base = cpu_wait_ns;
        }
        let waited_ns = match (self.cpu_wait_base, cpu_wait_ns) {
            (Some(base), Some(now_ns)) => now_ns.saturating_sub(base),
            _ => 0,
        };
        let waited = (waited_ns as f64 / nanos_per_tick) as Ticks;
        let so_far = now.saturating_sub(started);
        let blocked = so_far.saturating_sub(waited);
        let due = stall_report_due(threshold, self.reports);
        if blocked < due {
            return Look::Until(now.saturating_add(due - blocked));
        }
        self.reports += 1;
        let next_due = stall_report_due(threshold, self.reports);
        Look::Report {
            so_far,
            number: self.reports,
            next: now.saturating_add(next_due.saturating_sub(blocked)),
        }
    }
}

/// One Python frame of a stack read while the step runs, innermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SampledFrame {
    pub filename: String,
    pub function: String,
    pub line: Option<u32>,
    /// The span of the expression the frame was running (3.11+): for a call in progress, the
    /// whole call, from which the always-on mode names a C function.
    pub span: Option<Span>,
    /// A coroutine's (or async generator's) frame.
    pub is_coroutine: bool,
    /// The innermost frame only: it stood at the same instruction across reads some tens of µs
    /// apart while its thread slept in the kernel: it waits for what that instruction does (a C
    /// call that sleeps, reads, locks), it does not run its own code.
    pub still: bool,
}

/// A step still running, as the watchdog saw it.
#[derive(Clone, Debug)]
pub struct RunningStall {
    pub pid: u32,
    pub thread_name: String,
    pub so_far_ms: f64,
    /// Innermost first; empty when the stack could not be read.
    pub stack: Vec<SampledFrame>,
    /// The thread was running a garbage collection when its stack was read: the innermost
    /// frame is the one the collection interrupted.
    pub in_gc: bool,
    /// The stack read was the unit's own only (a unit of a loop implemented in C), and it had no
    /// Python frame: the loop runs C code (a C function as a callback), not that nothing could
    /// be read.
    pub in_c_code: bool,
    /// The thread was waiting for the GIL when it was last looked at: what the thread that held
    /// it was running, if that could be read (`Some("")` when not).
    pub waiting_for_gil: Option<String>,
}

impl RunningStall {
    /// The lines written to stderr for it: a headline naming the innermost frame, then up to
    /// `STALL_LINE_FRAMES` frames.
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "loopwatch[{}]: the event loop of thread '{}' has been blocked for {:.0} ms so far, still running",
            self.pid, self.thread_name, self.so_far_ms
        );
        if self.in_gc {
            text.push_str(", in a garbage collection");
        }
        match self.waiting_for_gil.as_deref() {
            Some("") => text.push_str(", waiting for the GIL held by another thread"),
            Some(running) => {
                let _ = write!(
                    text,
                    ", waiting for the GIL held by another thread (running {running})"
                );
            }
            None => {}
        }
        match self.stack.first() {
            Some(top) => {
                let _ = write!(text, ", at {}", frame_place(top));
            }
            None if self.in_c_code => {
                text.push_str(", in C code the loop called (no Python frame of its own)");
            }
            None => text.push_str(" (its stack could not be read)"),
        }
        text.push('\n');
        for frame in self.stack.iter().take(STALL_LINE_FRAMES) {
            let _ = writeln!(text, "    {}", frame_place(frame));
        }
        if self.stack.len() > STALL_LINE_FRAMES {
            let _ = writeln!(
                text,
                "    ... {} more frames",
                self.stack.len() - STALL_LINE_FRAMES
            );
        }
        text
    }
}

fn frame_place(frame: &SampledFrame) -> String {
    match frame.line {
        Some(line) => format!("{}:{} in {}", frame.filename, line, frame.function),
        None => format!("{} in {}", frame.filename, frame.function),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_of_a_running_stall_come_at_growing_multiples_of_the_threshold() {
        assert_eq!(stall_report_due(50, 0), 50);
        assert_eq!(stall_report_due(50, 1), 500);
        assert_eq!(stall_report_due(50, 2), 5000);
        assert_eq!(stall_report_due(u64::MAX / 2, 1), Ticks::MAX);
        assert_eq!(stall_report_due(1, 40), Ticks::MAX);
    }

    #[test]
    fn a_running_unit_is_reported_at_the_threshold_then_at_ten_and_a_hundred_times_it() {
        let mut timer = StallTimer::default();
        assert_eq!(timer.look(2, 0, 100, 50, 1.0, None), Look::Idle);
        assert_eq!(timer.look(3, 100, 110, 50, 1.0, None), Look::Until(150));
        assert_eq!(
            timer.look(3, 100, 151, 50, 1.0, None),
            Look::Report {
                so_far: 51,
                number: 1,
                next: 600
            }
        );
        assert_eq!(timer.look(3, 100, 400, 50, 1.0, None), Look::Until(600));
        assert_eq!(
            timer.look(3, 100, 600, 50, 1.0, None),
            Look::Report {
                so_far: 500,
                number: 2,
                next: 5100
            }
        );
        // The next unit starts afresh.
        assert_eq!(timer.look(4, 100, 700, 50, 1.0, None), Look::Idle);
        assert_eq!(
            timer.look(5, 700, 760, 50, 1.0, None),
            Look::Report {
                so_far: 60,
                number: 1,
                next: 1200
            }
        );
    }

    #[test]
    fn the_cpu_wait_is_needed_once_a_stall_has_run_half_the_threshold_and_once_it_is_due() {
        let mut timer = StallTimer::default();
        assert!(
            !timer.needs_cpu_wait(1, 0, 10, 50),
            "a young step costs no read"
        );
        assert_eq!(timer.look(1, 0, 10, 50, 1.0, None), Look::Until(50));
        assert!(timer.needs_cpu_wait(1, 0, 25, 50), "its baseline");
        assert_eq!(timer.look(1, 0, 25, 50, 1.0, Some(7)), Look::Until(50));
        assert!(!timer.needs_cpu_wait(1, 0, 30, 50));
        assert!(timer.needs_cpu_wait(1, 0, 50, 50), "due");
        assert!(!timer.needs_cpu_wait(2, 0, 60, 50), "no step runs");
        assert!(
            timer.needs_cpu_wait(3, 60, 90, 50),
            "a new stall, half the threshold in"
        );
    }

    #[test]
    fn time_spent_waiting_for_a_cpu_delays_the_report() {
        let mut timer = StallTimer::default();
        // First seen with 1000 ns waited so far; 30 more by the next look.
        assert_eq!(timer.look(1, 0, 10, 50, 1.0, Some(1000)), Look::Until(50));
        assert_eq!(timer.look(1, 0, 60, 50, 1.0, Some(1030)), Look::Until(80));
        assert_eq!(
            timer.look(1, 0, 80, 50, 1.0, Some(1030)),
            Look::Report {
                so_far: 80,
                number: 1,
                next: 530
            }
        );
    }

    fn frame(function: &str, line: Option<u32>) -> SampledFrame {
        SampledFrame {
            filename: "app.py".into(),
            function: function.into(),
            line,
            span: None,
            is_coroutine: false,
            still: false,
        }
    }

    #[test]
    fn the_line_names_the_innermost_frame_and_cuts_long_stacks() {
        let stall = RunningStall {
            pid: 7,
            thread_name: "MainThread".into(),
            so_far_ms: 1234.4,
            stack: (0..10)
                .map(|i| frame(&format!("f{i}"), Some(i + 1)))
                .collect(),
            in_gc: false,
            in_c_code: false,
            waiting_for_gil: None,
        };
        let text = stall.to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "loopwatch[7]: the event loop of thread 'MainThread' has been blocked for 1234 ms so far, still running, at app.py:1 in f0"
        );
        assert_eq!(lines[1], "    app.py:1 in f0");
        assert_eq!(lines.len(), 1 + STALL_LINE_FRAMES + 1);
        assert_eq!(lines[lines.len() - 1], "    ... 2 more frames");
    }

    #[test]
    fn a_stack_that_could_not_be_read_is_said() {
        let stall = RunningStall {
            pid: 7,
            thread_name: "t".into(),
            so_far_ms: 50.0,
            stack: vec![],
            in_gc: false,
            in_c_code: false,
            waiting_for_gil: None,
        };
        assert!(stall
            .to_text()
            .starts_with("loopwatch[7]: the event loop of thread 't' has been blocked for 50 ms so far, still running (its stack could not be read)\n"));
        let no_line = RunningStall {
            stack: vec![frame("g", None)],
            ..stall
        };
        assert!(no_line.to_text().contains(", at app.py in g\n"));
    }

    #[test]
    fn a_unit_of_a_c_loop_running_no_python_frame_is_said_to_run_c_code() {
        let stall = RunningStall {
            pid: 7,
            thread_name: "t".into(),
            so_far_ms: 50.0,
            stack: vec![],
            in_gc: false,
            in_c_code: true,
            waiting_for_gil: None,
        };
        assert_eq!(
            stall.to_text(),
            "loopwatch[7]: the event loop of thread 't' has been blocked for 50 ms so far, still running, in C code the loop called (no Python frame of its own)\n"
        );
    }

    #[test]
    fn a_stall_waiting_for_the_gil_says_so_and_what_its_holder_runs() {
        let stall = RunningStall {
            pid: 7,
            thread_name: "t".into(),
            so_far_ms: 40.0,
            stack: vec![frame("handler", Some(3))],
            in_gc: false,
            in_c_code: false,
            waiting_for_gil: Some("spin (worker.py:9)".into()),
        };
        assert!(stall.to_text().starts_with(
            "loopwatch[7]: the event loop of thread 't' has been blocked for 40 ms so far, still running, waiting for the GIL held by another thread (running spin (worker.py:9)), at app.py:3 in handler\n"
        ));
    }

    #[test]
    fn a_stall_in_a_garbage_collection_says_so_before_the_frame_it_interrupted() {
        let stall = RunningStall {
            pid: 7,
            thread_name: "t".into(),
            so_far_ms: 500.0,
            stack: vec![frame("allocate", Some(3))],
            in_gc: true,
            in_c_code: false,
            waiting_for_gil: None,
        };
        assert!(stall.to_text().starts_with(
            "loopwatch[7]: the event loop of thread 't' has been blocked for 500 ms so far, still running, in a garbage collection, at app.py:3 in allocate\n"
        ));
    }
}
