//! loopwatch-core: everything loopwatch decides, in pure Rust with no Python in sight.
//! The binding feeds profile events in and gets blocking episodes out; tests do the same with synthetic events.

pub mod clock;
pub mod cpu_wait;
pub mod episode;
pub mod filter;
pub mod gc;
pub mod gil;
pub mod linetable;
pub mod recording;
pub mod sampled;
pub mod stall;
pub mod tracker;

pub use clock::Clock;
pub use episode::{Episode, EpisodeKind, FrameInfo, StackFrame, TaskInfo};
pub use filter::{FilterError, FilterSet};
pub use gc::{GcLog, GcTime};
pub use linetable::{LineTable, Position, Span};
pub use stall::{stall_report_due, Look, RunningStall, SampledFrame, StallTimer};
pub use tracker::{FrameRef, Resolver, Tag, Ticks, Tracker};
