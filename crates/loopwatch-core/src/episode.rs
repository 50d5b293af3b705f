//! The report model: what one blocking episode says about itself. Serializable so that the
//! same record can be logged, handed to Python, or written to a recording.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Where a blocking episode happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EpisodeKind {
    /// A sync call made from a coroutine step ran over the threshold.
    Call,
    /// A sync loop callback (`call_soon`, a done-callback, a protocol method) ran over the threshold.
    Callback,
    /// A coroutine step ran over the threshold with no single call over it.
    Step,
    /// A callback or step ran over the threshold only because a garbage collection ran inside
    /// it: the collection is the culprit, not the frame it interrupted.
    Gc,
    /// A callback or step ran over the threshold only because its thread waited for the GIL
    /// while other threads held it: the wait is the culprit, naming those threads.
    Gil,
}

impl EpisodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EpisodeKind::Call => "call",
            EpisodeKind::Callback => "callback",
            EpisodeKind::Step => "step",
            EpisodeKind::Gc => "gc",
            EpisodeKind::Gil => "gil",
        }
    }
}

/// What the binding tells the tracker about one frame or C function, on the slow path only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameInfo {
    /// Module-qualified name: `time.sleep`, `myapp.service.process_data`.
    pub name: String,
    /// The module the code belongs to, for filters: `time`, `myapp.service`.
    pub module: String,
    /// Source file of Python code; `None` for C functions.
    pub filename: Option<String>,
    /// First line of the function's definition.
    pub def_line: Option<u32>,
    /// The line executing when the frame returned (or when it was looked at).
    pub line_now: Option<u32>,
    /// For a coroutine: the line at which this step resumed it.
    pub resume_line: Option<u32>,
}

/// One frame of an episode's stack, outermost first.
#[allow(clippy::struct_excessive_bools)] // independent facts about one frame
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StackFrame {
    pub name: String,
    pub filename: Option<String>,
    /// The line this frame was on while the loop was blocked: where it called the next frame,
    /// the line a step started at, or a function's first line when it blocked in its own code.
    pub lineno: Option<u32>,
    /// For a coroutine step: the line where the step ended (suspended or returned).
    pub end_lineno: Option<u32>,
    pub duration_ns: u64,
    pub is_c_call: bool,
    pub is_coroutine: bool,
    /// Whether the filters let this frame be blamed.
    pub included: bool,
}

/// The name a garbage collection is reported under, as a culprit.
pub fn gc_culprit_name(generation: Option<u8>) -> String {
    match generation {
        Some(generation) => format!("garbage collection (generation {generation})"),
        None => "garbage collection".to_owned(),
    }
}

/// One blocking episode: one continuous stall of the loop by one callback or task step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    pub kind: EpisodeKind,
    /// How long the loop was blocked: the whole callback or step. It ended when it was
    /// reported, so it also says how long ago it started.
    pub duration_ns: u64,
    /// The threshold in force when the episode was found.
    pub threshold_ns: u64,
    /// Of `duration_ns`, how long (at least) the thread was ready to run but had no CPU: the
    /// machine was busy, the code did not run. 0 where the OS does not say.
    pub cpu_wait_ns: u64,
    /// Of `duration_ns`, how long the loop's thread spent in garbage collections (the wall time
    /// of those that ran inside the episode).
    #[serde(default)]
    pub gc_ns: u64,
    /// The oldest generation among those collections; `None` when none ran.
    #[serde(default)]
    pub gc_generation: Option<u8>,
    /// Of `duration_ns`, how long (at least) the loop's thread waited for the GIL while other
    /// threads held it. 0 where it is not known.
    #[serde(default)]
    pub gil_wait_ns: u64,
    /// The threads that held the GIL meanwhile, longest first.
    #[serde(default)]
    pub gil_holders: Vec<GilHolder>,
    /// The task's await chain, then the sync chain down to (at least) the culprit.
    pub stack: Vec<StackFrame>,
    /// Index of the culprit in `stack`.
    pub culprit: usize,
    pub task_name: Option<String>,
    /// The binding's token for the monitoring scope the task ran in (per-request monitoring).
    pub scope: Option<u64>,
    /// How many times a watchdog reported this stall while it was still running.
    #[serde(default)]
    pub reports_while_running: u32,
    /// The reports of one callback or step share this number, unique in the process: a unit
    /// in which several sibling calls each ran over the threshold makes one report per culprit.
    #[serde(default)]
    pub episode_id: u64,
    /// How many reports (culprits) the unit made: 1 but for such sibling calls.
    #[serde(default = "one")]
    pub culprits: u32,
    /// Of `duration_ns`, the part this report's culprit accounts for: all of it when it is the
    /// unit's only culprit, else its own branch of the unit. The shares of one unit never
    /// overlap, so they add up to at most its duration.
    #[serde(default)]
    pub share_ns: u64,
}

/// The number of culprits a report from before several were told apart stands for.
pub(crate) fn one() -> u32 {
    1
}

static FIRST_EPISODE_ID: OnceLock<u64> = OnceLock::new();
static EPISODES_NUMBERED: AtomicU64 = AtomicU64::new(0);

/// A number no other unit of this process has had (a forked child goes on from its parent's,
/// and its reports carry its own pid). The numbers start from the millisecond of the first one,
/// shifted up 16 bits: a recording added to by many runs of a program whose pid repeats (pid 1 in
/// a container) never has two steps of one pid under one number.
pub fn next_episode_id() -> u64 {
    let first = *FIRST_EPISODE_ID.get_or_init(|| {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |since| since.as_millis() as u64);
        (ms << 16).max(1)
    });
    first.wrapping_add(EPISODES_NUMBERED.fetch_add(1, Ordering::Relaxed))
}

/// A thread that held the GIL while the loop's thread waited for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GilHolder {
    /// Its `threading` ident, 0 when unknown.
    pub thread_id: u64,
    pub thread_name: Option<String>,
    /// How long the loop's thread waited while it held the GIL.
    pub wait_ns: u64,
    /// What it was running, where its stack could be read: `function (file:line)`.
    pub running: Option<String>,
}

/// What the tracker learns about the task that runs a unit, asked once at its first slow frame.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskInfo {
    pub name: Option<String>,
    /// An opaque token for the monitoring scope the task runs in, if any: episodes carry it so
    /// the binding can hand each one to the scope (say, the request) it belongs to.
    pub scope: Option<u64>,
}

impl Episode {
    /// The time the code itself held the loop: the duration less the wait for a CPU.
    pub fn own_time_ns(&self) -> u64 {
        self.duration_ns.saturating_sub(self.cpu_wait_ns)
    }

    /// Whether the loop stalled only because its thread got no CPU: without the wait, the
    /// episode would be under the threshold. Such an episode blames no code.
    pub fn starved(&self) -> bool {
        self.own_time_ns() < self.threshold_ns
    }

    pub fn culprit_frame(&self) -> &StackFrame {
        &self.stack[self.culprit]
    }

    /// Where a person should look: the culprit's own line, or for a C function the line of
    /// Python code that called it.
    pub fn location(&self) -> (Option<&str>, Option<u32>) {
        self.stack[..=self.culprit]
            .iter()
            .rev()
            .find(|frame| frame.filename.is_some())
            .map_or((None, None), |frame| {
                (frame.filename.as_deref(), frame.lineno)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episode_numbers_differ_and_start_from_when_the_process_first_numbered_one() {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let (a, b) = (next_episode_id(), next_episode_id());
        assert!(b > a);
        // Another run of the program, with the same pid, an hour earlier or later, numbers
        // its steps elsewhere.
        let hour = 3_600_000u64 << 16;
        assert!(a > ((now_ms << 16) - hour) && a < ((now_ms << 16) + hour));
    }
}
