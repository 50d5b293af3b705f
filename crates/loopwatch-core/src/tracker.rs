//! The tracker: a state machine fed with one thread's profile events (`call`, `return`, `c_call`,
//! `c_return`) that turns them into blocking episodes.
//!
//! Every frame is pushed with a role. Frames outside any running loop, and the loop's own machinery
//! (`run_forever`, `_run_once`, the selector wait), are never timed as blocking. A *dispatcher*
//! (`Handle._run`, `Context.run`, or a frame under which a C loop such as uvloop runs) calls one
//! loop callback at a time; the first frame below it starts a *unit*: one callback or one task step,
//! which is one stall of the loop. Inside a unit the hot path only pushes and pops fixed-size
//! entries. When an entry returns over the threshold the tracker asks the [`Resolver`] to name it
//! and links it under its parent, beside its siblings that did too; when the unit ends, each branch
//! of that tree that holds a blameable frame becomes one [`Episode`], with the deepest blameable
//! frame of the branch as its culprit: nested calls make one report, sibling calls one each.

use crate::episode::{
    next_episode_id, Episode, EpisodeKind, FrameInfo, GilHolder, StackFrame, TaskInfo,
};
use std::collections::{HashMap, HashSet};

use crate::filter::FilterSet;
use crate::gc::GcTime;
use crate::gil::{gil_holders, not_the_code, waited_frame, GilTime, NotTheCode};

/// A raw clock reading; only differences are meaningful.
pub type Ticks = u64;

/// What the binding knows about a code object or C function before it runs; cached per code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tag(u8);

impl Tag {
    pub const PLAIN: Tag = Tag(0);
    /// A coroutine, async generator or iterable coroutine: its call/return pairs are task steps.
    pub const COROUTINE: Tag = Tag(1);
    /// A Python event loop's `run_forever`: what it calls directly is loop machinery.
    pub const LOOP_RUN: Tag = Tag(2);
    /// Runs exactly one loop callback (`Handle._run`, `Context.run`).
    pub const DISPATCH: Tag = Tag(4);

    #[must_use]
    pub const fn union(self, other: Tag) -> Tag {
        Tag(self.0 | other.0)
    }

    pub const fn contains(self, other: Tag) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn bits(self) -> u8 {
        self.0
    }

    pub const fn from_bits(bits: u8) -> Tag {
        Tag(bits & 7)
    }
}

/// How the tracker treats a frame, decided once when it is pushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// No event loop runs beneath this frame.
    Outside,
    /// The loop's own code; nothing below it blocks on its own account.
    Machinery,
    /// A frame beneath which a C-implemented loop (uvloop) runs callbacks.
    Host,
    /// Runs one callback; the frame below it starts a unit.
    Dispatcher,
    /// Part of a callback or task step.
    Work,
}

const NO_NODE: u32 = u32::MAX;
const NO_LINE: u32 = 0;

/// One live frame. Fixed size, no heap: this is all the hot path touches.
#[derive(Clone, Copy, Debug)]
struct Entry {
    key: u64,
    start: Ticks,
    /// Dispatchers: time spent in units and nested dispatchers below, to find invisible callbacks.
    accounted: Ticks,
    /// Coroutines: the binding's position hint for the line this step resumed at.
    resume: i32,
    /// Arena index of the latest over-threshold child that has returned (the others are
    /// linked from it, latest first).
    blame: u32,
    role: Role,
    is_c: bool,
    is_coroutine: bool,
}

impl Entry {
    /// A frame that starts `now`, with nothing measured below it yet.
    #[inline(always)]
    fn started(
        key: u64,
        now: Ticks,
        role: Role,
        is_c: bool,
        resume: i32,
        is_coroutine: bool,
    ) -> Self {
        Entry {
            key,
            start: now,
            accounted: 0,
            resume,
            blame: NO_NODE,
            role,
            is_c,
            is_coroutine,
        }
    }
}

/// A frame that returned over the threshold, kept until its unit ends.
#[derive(Clone, Debug)]
#[allow(clippy::struct_excessive_bools)] // independent facts about one frame, not a state machine
struct Node {
    info: FrameInfo,
    duration: Ticks,
    /// Of `duration`, what garbage collections took.
    gc: GcTime,
    /// Of `duration`, how long the thread waited for the GIL.
    gil: GilTime,
    /// The latest over-threshold child; its `sibling`s are the earlier ones.
    child: u32,
    /// The previous over-threshold child of the same parent.
    sibling: u32,
    /// The line the parent was on when it called this frame.
    called_from: u32,
    is_c: bool,
    is_coroutine: bool,
    included: bool,
    /// This node or a descendant may be blamed as a (non-coroutine) culprit.
    has_culprit: bool,
}

impl Node {
    /// The time that was not garbage collection.
    fn own(&self) -> Ticks {
        self.duration.saturating_sub(self.gc.ticks)
    }
}

/// Identifies a frame to the [`Resolver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRef {
    pub key: u64,
    pub is_c: bool,
    pub resume: i32,
    /// True while the frame's own return event is being handled; false when it is still running.
    pub returning: bool,
}

/// Everything the tracker needs from the interpreter, asked only on the slow path.
pub trait Resolver {
    /// Names a frame (or C function) that ran over the threshold.
    fn describe(&mut self, frame: FrameRef) -> FrameInfo;
    /// The line a still-running Python frame is executing: where it called its child.
    fn current_line(&mut self, key: u64) -> Option<u32>;
    /// The callback a dispatcher ran when it was not visible as a frame of its own
    /// (a C function scheduled with `call_soon`), and whether it is a C function.
    fn dispatched_callback(&mut self, dispatcher_key: u64) -> Option<(FrameInfo, bool)>;
    /// The task running now: its name and monitoring scope, if any.
    fn task(&mut self) -> TaskInfo;
    /// Whether an event loop is running on this thread now.
    fn loop_is_running(&mut self) -> bool;
    /// How long this thread has waited so far, ready to run, for a CPU (nanoseconds, cumulative),
    /// where the OS says. Asked at most about once a millisecond, and once per episode.
    fn cpu_wait_ns(&mut self) -> Option<u64> {
        None
    }
    /// How much of `[from, to)` this thread spent in garbage collections. Asked on the slow path
    /// only, once per frame of an episode.
    fn gc_within(&mut self, from: Ticks, to: Ticks) -> GcTime {
        let _ = (from, to);
        GcTime::default()
    }
    /// How much of `[from, to)` this thread waited for the GIL, and which threads held it. Asked
    /// on the slow path only, once per frame of an episode.
    fn gil_within(&mut self, from: Ticks, to: Ticks) -> GilTime {
        let _ = (from, to);
        GilTime::default()
    }
    /// The names of the threads with these `threading` idents, where known, in the same order.
    fn thread_names(&mut self, idents: &[u64]) -> Vec<Option<String>> {
        vec![None; idents.len()]
    }
}

/// A reading of the thread's cumulative wait for a CPU, and when it was taken.
#[derive(Clone, Copy, Debug)]
struct CpuWaitMark {
    at: Ticks,
    waited_ns: u64,
}

/// The oldest a CPU-wait reading may be when a unit starts: whatever the thread waited between
/// the reading and the start is, at worst, counted as the unit's own time.
const CPU_WAIT_MARK_MAX_AGE_NS: f64 = 1e6;

/// One thread's call tracker.
pub struct Tracker {
    stack: Vec<Entry>,
    /// Role of the (virtual) frame below the bottom of the stack.
    base_role: Role,
    threshold: Ticks,
    nanos_per_tick: f64,
    filters: FilterSet,
    /// Stack index of the entry that started the current unit.
    unit_root: Option<usize>,
    /// The unit runs under a `Host` frame: its loop can stop without a visible return.
    unit_hosted: bool,
    /// Units started so far (see `units_started`).
    units_started: u64,
    /// The running task's name, once asked (at the unit's first slow frame).
    unit_task: Option<TaskInfo>,
    arena: Vec<Node>,
    finished: Vec<Episode>,
    cpu_wait_mark: Option<CpuWaitMark>,
    /// Cleared when the OS cannot say how long the thread waited for a CPU: not asked again.
    cpu_wait_known: bool,
    cpu_wait_mark_max_age: Ticks,
}

impl Tracker {
    /// A tracker reporting episodes of at least `threshold` ticks.
    pub fn new(threshold: Ticks, nanos_per_tick: f64, filters: FilterSet) -> Self {
        let mut tracker = Self {
            stack: Vec::with_capacity(256),
            base_role: Role::Outside,
            threshold: 1,
            nanos_per_tick,
            filters,
            unit_root: None,
            unit_hosted: false,
            units_started: 0,
            unit_task: None,
            arena: Vec::new(),
            finished: Vec::new(),
            cpu_wait_mark: None,
            cpu_wait_known: true,
            cpu_wait_mark_max_age: 0,
        };
        tracker.set_threshold(threshold);
        tracker
    }

    /// Changes the threshold and filters; the caller flushes first so nothing is judged twice.
    pub fn configure(&mut self, threshold: Ticks, filters: FilterSet) {
        self.set_threshold(threshold);
        self.filters = filters;
    }

    fn set_threshold(&mut self, threshold: Ticks) {
        self.threshold = threshold.max(1);
        // Never more than an eighth of the threshold, so that the error stays small beside it.
        let max_age = (CPU_WAIT_MARK_MAX_AGE_NS / self.nanos_per_tick) as Ticks;
        self.cpu_wait_mark_max_age = max_age.min(self.threshold / 8);
    }

    /// The threshold, in ticks.
    pub fn threshold(&self) -> Ticks {
        self.threshold
    }

    pub fn depth(&self) -> usize {
        self.stack.len()
    }

    pub fn in_unit(&self) -> bool {
        self.unit_root.is_some()
    }

    /// A loop implemented in C (uvloop) is about to run a callback from inside the top frame (the
    /// binding saw it enter the callback's context): that frame hosts the loop, so what it runs
    /// next is a unit, even before any task step has shown it (a protocol's callback may come
    /// first).
    pub fn hosts_a_c_loop(&mut self) {
        if self.unit_root.is_some() {
            return;
        }
        match self.stack.last_mut() {
            Some(entry) if entry.role == Role::Outside => entry.role = Role::Host,
            None if self.base_role == Role::Outside => self.base_role = Role::Host,
            _ => {}
        }
    }

    /// Whether a Python loop's dispatcher (`Handle._run`, `Context.run`) is about to run a
    /// callback: the context it enters is its own business, not a C loop's.
    pub fn dispatching(&self) -> bool {
        self.unit_root.is_none() && self.top_role() == Role::Dispatcher
    }

    /// How many units have started so far (wrapping): the same before and after a stretch of
    /// time means no Python frame ran in it as a callback or task step.
    pub fn units_started(&self) -> u64 {
        self.units_started
    }

    /// Says of the episodes just finished (those of the unit that has just ended) that a watchdog
    /// reported their stall `reports` times while it ran.
    pub fn note_reports_while_running(&mut self, reports: u32) {
        for episode in &mut self.finished {
            episode.reports_while_running = reports;
        }
    }

    /// When the running unit (callback or task step) started, if one runs: what a watchdog on
    /// another thread times a stall from. Changes only on the general path.
    pub fn unit_started_at(&self) -> Option<Ticks> {
        self.unit_root
            .and_then(|root| self.stack.get(root))
            .map(|entry| entry.start)
    }

    /// Episodes finished since the last call, oldest first.
    pub fn take_episodes(&mut self) -> Vec<Episode> {
        std::mem::take(&mut self.finished)
    }

    pub fn has_episodes(&self) -> bool {
        !self.finished.is_empty()
    }

    /// Forgets every frame (the hook is being removed).
    pub fn reset(&mut self) {
        self.stack.clear();
        self.base_role = Role::Outside;
        self.end_unit();
    }

    /// In the child of a `fork()`: forgets everything the parent had seen, its frames, its
    /// unfinished unit and its finished episodes not yet taken, and its CPU-wait reading (the
    /// child's thread has a wait of its own). What the child runs from now on is judged afresh,
    /// so the parent's in-flight episode is never reported, nor merged into one of the child's.
    pub fn forget_the_parent(&mut self) {
        self.reset();
        self.finished.clear();
        self.cpu_wait_mark = None;
        self.cpu_wait_known = true;
    }

    /// A Python frame starts (or a generator or coroutine resumes).
    #[inline]
    pub fn on_call<R: Resolver>(&mut self, key: u64, tag: Tag, resume: i32, now: Ticks, r: &mut R) {
        self.push(key, tag, false, resume, now, r);
    }

    /// A C function starts.
    #[inline]
    pub fn on_c_call<R: Resolver>(&mut self, key: u64, tag: Tag, now: Ticks, r: &mut R) {
        self.push(key, tag, true, 0, now, r);
    }

    /// A Python frame returns, raises out, or a generator or coroutine suspends.
    #[inline]
    pub fn on_return<R: Resolver>(&mut self, key: u64, now: Ticks, r: &mut R) {
        self.pop_matching(key, false, now, r);
    }

    /// A C function returns or raises.
    #[inline]
    pub fn on_c_return<R: Resolver>(&mut self, key: u64, now: Ticks, r: &mut R) {
        self.pop_matching(key, true, now, r);
    }

    /// The hot path of a call: a plain (not coroutine, not loop) frame inside a unit, or one in
    /// the loop's machinery or outside any loop, pushed with no allocation. Returns false,
    /// having done nothing, when the general path must decide.
    #[inline(always)]
    pub fn try_push_plain(&mut self, key: u64, tag: Tag, is_c: bool, now: Ticks) -> bool {
        if tag != Tag::PLAIN || self.stack.len() == self.stack.capacity() {
            return false;
        }
        let role = if self.unit_root.is_some() {
            Role::Work
        } else {
            match self.top_role() {
                // What `structural_role` gives a plain frame under these.
                role @ (Role::Outside | Role::Machinery) => role,
                Role::Host | Role::Dispatcher | Role::Work => return false,
            }
        };
        self.stack
            .push(Entry::started(key, now, role, is_c, 0, false));
        true
    }

    /// The hot path of a return: the top entry is the returning frame and nothing is to be
    /// judged (loop machinery, code outside a loop, or work under the threshold that did not
    /// start its unit), so it is simply dropped. Returns false, having done nothing, when the
    /// general path must decide.
    #[inline(always)]
    pub fn try_pop_plain(&mut self, key: u64, is_c: bool, now: Ticks) -> bool {
        let Some(top) = self.stack.last() else {
            return false;
        };
        if top.key != key || top.is_c != is_c {
            return false;
        }
        let nothing_to_judge = match top.role {
            Role::Work => {
                now.saturating_sub(top.start) < self.threshold
                    && self.unit_root != Some(self.stack.len() - 1)
            }
            Role::Outside | Role::Machinery => true,
            Role::Host | Role::Dispatcher => false,
        };
        if nothing_to_judge {
            self.stack.pop();
        }
        nothing_to_judge
    }

    /// Pushes frames that were already running when monitoring began, outermost first.
    /// They are timed from `now`: only what is seen is measured.
    pub fn seed<R: Resolver>(&mut self, frames: &[(u64, Tag, i32)], now: Ticks, r: &mut R) {
        for &(key, tag, resume) in frames {
            self.push(key, tag, false, resume, now, r);
        }
    }

    /// Reports what the running unit has blocked so far as if every frame returned `now`,
    /// then times all live frames afresh from `now`, so nothing is reported twice.
    pub fn flush<R: Resolver>(&mut self, now: Ticks, r: &mut R) {
        let running = self.unit_root.map(|root| (root, self.unit_hosted));
        if let Some((root, _)) = running {
            let mut below: u32 = NO_NODE;
            for index in (root..self.stack.len()).rev() {
                let entry = self.stack[index];
                let duration = now.saturating_sub(entry.start);
                if duration < self.threshold {
                    continue;
                }
                let node = self.record_over(entry, duration, false, r);
                if index > root {
                    self.attach(index - 1, node, r);
                } else {
                    below = node;
                }
            }
            let root_entry = self.stack[root];
            self.finish_unit(below, &root_entry, now, r);
        }
        for entry in &mut self.stack {
            entry.start = now;
            entry.accounted = 0;
            entry.blame = NO_NODE;
        }
        if let Some((root, hosted)) = running {
            // The unit goes on, judged only from `now`.
            self.unit_root = Some(root);
            self.unit_hosted = hosted;
        }
    }

    fn top_role(&self) -> Role {
        self.stack.last().map_or(self.base_role, |e| e.role)
    }

    #[inline]
    fn push<R: Resolver>(
        &mut self,
        key: u64,
        tag: Tag,
        is_c: bool,
        resume: i32,
        now: Ticks,
        r: &mut R,
    ) {
        let role = if self.unit_root.is_some() {
            Role::Work
        } else {
            self.structural_role(tag, r)
        };
        if role == Role::Work && self.unit_root.is_none() {
            self.unit_hosted = self.top_role() == Role::Host;
            self.unit_root = Some(self.stack.len());
            self.units_started = self.units_started.wrapping_add(1);
            self.unit_task = None;
            self.refresh_cpu_wait_mark(now, r);
        } else if role == Role::Dispatcher {
            self.refresh_cpu_wait_mark(now, r);
        }
        let is_coroutine = tag.contains(Tag::COROUTINE);
        self.stack
            .push(Entry::started(key, now, role, is_c, resume, is_coroutine));
    }

    /// The role of a frame pushed outside any unit.
    fn structural_role<R: Resolver>(&mut self, tag: Tag, r: &mut R) -> Role {
        let mut parent = self.top_role();
        if parent == Role::Outside && tag.contains(Tag::COROUTINE) && r.loop_is_running() {
            // A task step with no Python loop frame below it: a C loop (uvloop) runs it from
            // inside the frame below, which is therefore where callbacks are dispatched from.
            match self.stack.last_mut() {
                Some(entry) => entry.role = Role::Host,
                None => self.base_role = Role::Host,
            }
            parent = Role::Host;
        }
        match parent {
            Role::Outside if !tag.contains(Tag::LOOP_RUN) => Role::Outside,
            Role::Machinery | Role::Host | Role::Dispatcher if tag.contains(Tag::DISPATCH) => {
                Role::Dispatcher
            }
            Role::Outside | Role::Machinery => Role::Machinery,
            Role::Host | Role::Dispatcher | Role::Work => Role::Work,
        }
    }

    #[inline]
    fn pop_matching<R: Resolver>(&mut self, key: u64, is_c: bool, now: Ticks, r: &mut R) {
        let Some(top) = self.stack.last() else {
            return;
        };
        if top.key == key && top.is_c == is_c {
            self.pop_top(now, r);
            return;
        }
        // A return for a frame that is not on top: either one we never saw start (monitoring
        // began inside it), or one whose inner frames lost their returns. Only the latter is
        // on the stack; its inner frames are dropped unjudged rather than guessed at.
        if let Some(pos) = self
            .stack
            .iter()
            .rposition(|e| e.key == key && e.is_c == is_c)
        {
            self.stack.truncate(pos + 1);
            if self.unit_root.is_some_and(|root| root > pos) {
                self.end_unit();
            }
            self.pop_top(now, r);
        }
    }

    fn pop_top<R: Resolver>(&mut self, now: Ticks, r: &mut R) {
        let Some(entry) = self.stack.pop() else {
            return;
        };
        let index = self.stack.len();
        let duration = now.saturating_sub(entry.start);
        match entry.role {
            Role::Work => {
                let is_root = self.unit_root == Some(index);
                if duration < self.threshold && !is_root {
                    return;
                }
                let node = if duration >= self.threshold {
                    self.record_over(entry, duration, true, r)
                } else {
                    NO_NODE
                };
                if is_root {
                    self.finish_unit(node, &entry, now, r);
                    self.credit_dispatcher(duration);
                } else {
                    self.attach(index - 1, node, r);
                }
            }
            Role::Dispatcher => {
                let unseen = duration.saturating_sub(entry.accounted);
                if unseen >= self.threshold {
                    self.report_invisible_callback(&entry, duration, unseen, r);
                }
                self.credit_dispatcher(duration);
            }
            Role::Outside | Role::Machinery | Role::Host => {}
        }
    }

    /// Tells the dispatcher below that `duration` of its time is accounted for.
    fn credit_dispatcher(&mut self, duration: Ticks) {
        if let Some(parent) = self.stack.last_mut() {
            if parent.role == Role::Dispatcher {
                parent.accounted = parent.accounted.saturating_add(duration);
            }
        }
    }

    /// Names an entry that ran over the threshold and keeps it until its unit ends.
    fn record_over<R: Resolver>(
        &mut self,
        entry: Entry,
        duration: Ticks,
        returning: bool,
        r: &mut R,
    ) -> u32 {
        if self.unit_task.is_none() {
            // Asked at the first slow frame, while the task that runs the unit is still current.
            self.unit_task = Some(r.task());
        }
        let info = r.describe(FrameRef {
            key: entry.key,
            is_c: entry.is_c,
            resume: entry.resume,
            returning,
        });
        let included = self
            .filters
            .allows(&info.name, &info.module, info.filename.as_deref());
        let child_has_culprit = self
            .children(entry.blame)
            .any(|child| self.arena[child as usize].has_culprit);
        let gc = r.gc_within(entry.start, entry.start.saturating_add(duration));
        let gil = r.gil_within(entry.start, entry.start.saturating_add(duration));
        self.arena.push(Node {
            info,
            duration,
            gc,
            gil,
            child: entry.blame,
            sibling: NO_NODE,
            called_from: NO_LINE,
            is_c: entry.is_c,
            is_coroutine: entry.is_coroutine,
            included,
            has_culprit: (included && !entry.is_coroutine) || child_has_culprit,
        });
        (self.arena.len() - 1) as u32
    }

    /// Links an over-threshold child under its parent, after its earlier siblings, with the line
    /// the parent called it from.
    fn attach<R: Resolver>(&mut self, parent_index: usize, node: u32, r: &mut R) {
        if node == NO_NODE {
            return;
        }
        let parent = self.stack[parent_index];
        let called_from = if parent.is_c {
            NO_LINE
        } else {
            r.current_line(parent.key).unwrap_or(NO_LINE)
        };
        let child = &mut self.arena[node as usize];
        child.called_from = called_from;
        child.sibling = parent.blame;
        self.stack[parent_index].blame = node;
    }

    /// The over-threshold children linked from `latest`, latest first.
    fn children(&self, latest: u32) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors((latest != NO_NODE).then_some(latest), move |&node| {
            let sibling = self.arena[node as usize].sibling;
            (sibling != NO_NODE).then_some(sibling)
        })
    }

    /// A node's over-threshold children in the order they ran.
    fn children_in_order(&self, node: u32) -> Vec<u32> {
        let mut children: Vec<u32> = self.children(self.arena[node as usize].child).collect();
        children.reverse();
        children
    }

    /// The child a single chain follows: one that holds a culprit beats one that does not, then
    /// the longer, not counting the collections that ran inside it; the earlier on a tie.
    fn best_child(&self, node: u32) -> Option<u32> {
        let key = |child: u32| {
            let child = &self.arena[child as usize];
            (child.has_culprit, child.own())
        };
        self.children_in_order(node)
            .into_iter()
            .fold(None, |best, child| match best {
                Some(best) if key(child) <= key(best) => Some(best),
                _ => Some(child),
            })
    }

    /// The chain of best children from `node` down.
    fn best_chain(&self, node: u32) -> Vec<u32> {
        std::iter::successors(Some(node), |&node| self.best_child(node)).collect()
    }

    /// Each branch from `node` down to a blameable end, in the order they ran: the children
    /// that are blameable and hold a culprit each start one; with none, the chain goes on
    /// through the best child while it is blameable (an excluded library call below the culprit).
    fn culprit_paths(
        &self,
        node: u32,
        blameable: &dyn Fn(&Node) -> bool,
        path: &mut Vec<u32>,
        paths: &mut Vec<Vec<u32>>,
    ) {
        path.push(node);
        let branches: Vec<u32> = self
            .children_in_order(node)
            .into_iter()
            .filter(|&child| {
                let child = &self.arena[child as usize];
                child.has_culprit && blameable(child)
            })
            .collect();
        if branches.is_empty() {
            match self.best_child(node) {
                Some(next) if blameable(&self.arena[next as usize]) => {
                    self.culprit_paths(next, blameable, path, paths);
                }
                _ => paths.push(path.clone()),
            }
        } else {
            for child in branches {
                self.culprit_paths(child, blameable, path, paths);
            }
        }
        path.pop();
    }

    /// Keeps a recent reading of the thread's CPU wait for the unit that starts `now`. Reading
    /// costs a system call, so a reading under the maximum age is reused.
    #[inline]
    fn refresh_cpu_wait_mark<R: Resolver>(&mut self, now: Ticks, r: &mut R) {
        let fresh = self
            .cpu_wait_mark
            .is_some_and(|mark| now.saturating_sub(mark.at) <= self.cpu_wait_mark_max_age);
        if !fresh && self.cpu_wait_known {
            self.read_cpu_wait(now, r);
        }
    }

    fn read_cpu_wait<R: Resolver>(&mut self, now: Ticks, r: &mut R) -> Option<CpuWaitMark> {
        let reading = r
            .cpu_wait_ns()
            .map(|waited_ns| CpuWaitMark { at: now, waited_ns });
        self.cpu_wait_known = reading.is_some();
        std::mem::replace(&mut self.cpu_wait_mark, reading)
    }

    /// How long, at least, the thread waited for a CPU between `start` and `now`. Whatever it
    /// waited between the last reading and `start` cannot be told apart, so that whole stretch
    /// is taken off: the result is never more than the true wait.
    fn cpu_wait_between<R: Resolver>(&mut self, start: Ticks, now: Ticks, r: &mut R) -> u64 {
        if !self.cpu_wait_known {
            return 0;
        }
        let (Some(mark), Some(latest)) = (self.read_cpu_wait(now, r), self.cpu_wait_mark) else {
            return 0;
        };
        let before_start = self.nanos(start.saturating_sub(mark.at));
        let within = self.nanos(now.saturating_sub(start));
        (latest.waited_ns.saturating_sub(mark.waited_ns))
            .saturating_sub(before_start)
            .min(within)
    }

    fn end_unit(&mut self) {
        self.unit_root = None;
        self.unit_hosted = false;
        self.unit_task = None;
        self.arena.clear();
    }

    /// Turns the unit's chain into an episode, if it has one and the filters leave a culprit.
    fn finish_unit<R: Resolver>(&mut self, root_node: u32, root: &Entry, now: Ticks, r: &mut R) {
        if root_node != NO_NODE && (!self.unit_hosted || r.loop_is_running()) {
            let duration = now.saturating_sub(root.start);
            let cpu_wait_ns = self.cpu_wait_between(root.start, now, r);
            let holders = self.gil_holders(&self.arena[root_node as usize].gil, r);
            let episodes = self.build_episodes(root_node, duration, cpu_wait_ns, &holders);
            self.finished.extend(episodes);
        }
        self.end_unit();
    }

    /// The unit's reports: one per culprit, in the order they ran (see `culprit_paths`); one
    /// naming the collection if the unit is over the threshold only because of collections.
    fn build_episodes(
        &self,
        root_node: u32,
        duration: Ticks,
        cpu_wait_ns: u64,
        gil_holders: &[GilHolder],
    ) -> Vec<Episode> {
        let threshold_ns = self.nanos(self.threshold);
        // A frame is blamed only if it is over the threshold even with all of the unit's wait
        // for a CPU inside it, and without the collections that ran inside it and its waits for
        // the GIL: a tiny call preempted on a busy machine, interrupted by a collection or made
        // to wait while another thread held the GIL, is not a culprit.
        let blameable = |node: &Node| {
            self.nanos(node.duration)
                .saturating_sub(cpu_wait_ns)
                .saturating_sub(self.nanos(node.gc.ticks))
                .saturating_sub(self.nanos(node.gil.ticks))
                >= threshold_ns
        };
        // The root's are the unit's.
        let unit_gc = self.arena[root_node as usize].gc;
        let gc_ns = self.nanos(unit_gc.ticks);
        let gil_wait_ns = self.nanos(self.arena[root_node as usize].gil.ticks);
        let episode = |kind, stack, culprit| Episode {
            kind,
            duration_ns: self.nanos(duration),
            threshold_ns,
            cpu_wait_ns,
            gc_ns,
            gc_generation: unit_gc.generation,
            gil_wait_ns,
            gil_holders: gil_holders.to_vec(),
            stack,
            culprit,
            task_name: self.unit_task.as_ref().and_then(|task| task.name.clone()),
            scope: self.unit_task.as_ref().and_then(|task| task.scope),
            reports_while_running: 0,
            episode_id: 0,
            culprits: 1,
            share_ns: self.nanos(duration),
        };
        let mut episodes = Vec::new();
        let waited = not_the_code(
            self.nanos(duration),
            cpu_wait_ns,
            gc_ns,
            gil_wait_ns,
            threshold_ns,
        );
        if let Some(cause) = waited {
            let gc = (unit_gc.generation, gc_ns);
            let waits = self.waited_report(root_node, cause, gc, (gil_holders, gil_wait_ns));
            if let Some((kind, stack, culprit)) = waits {
                episodes.push(episode(kind, stack, culprit));
            }
        } else {
            let paths = if blameable(&self.arena[root_node as usize]) {
                let mut paths = Vec::new();
                self.culprit_paths(root_node, &blameable, &mut Vec::new(), &mut paths);
                paths
            } else {
                // Starved (or nothing blameable): the best chain, judged as such by the reader.
                vec![self.best_chain(root_node)]
            };
            let found = self.culprits_of(&paths);
            // How many reports' paths each frame is on: a report's share is its shallowest
            // frame on no other's (the frames above it are shared with the unit's other culprits).
            let mut on_paths: HashMap<u32, usize> = HashMap::new();
            for &(p, _) in &found {
                for &node in &paths[p] {
                    *on_paths.entry(node).or_default() += 1;
                }
            }
            for &(p, culprit) in &found {
                let path = &paths[p];
                let chain: Vec<&Node> = path[..=culprit]
                    .iter()
                    .map(|&node| &self.arena[node as usize])
                    .collect();
                let kind = if chain[culprit].is_coroutine {
                    EpisodeKind::Step
                } else if chain[..culprit].iter().any(|n| n.is_coroutine) {
                    EpisodeKind::Call
                } else {
                    EpisodeKind::Callback
                };
                let stack = (0..=culprit)
                    .map(|i| self.stack_frame(path, i, i == culprit))
                    .collect();
                let mut report = episode(kind, stack, culprit);
                if found.len() > 1 {
                    let own = path
                        .iter()
                        .copied()
                        .find(|node| on_paths[node] == 1)
                        .unwrap_or(path[path.len() - 1]);
                    report.share_ns = self.nanos(self.arena[own as usize].duration);
                }
                episodes.push(report);
            }
        }
        let episode_id = next_episode_id();
        let culprits = u32::try_from(episodes.len()).unwrap_or(u32::MAX);
        for report in &mut episodes {
            report.episode_id = episode_id;
            report.culprits = culprits;
        }
        episodes
    }

    /// Frame `i` of `path` as the report shows it; `is_last`: it ends the report's stack.
    /// Each path's culprit, as (path, culprit's index in it): the deepest included frame that is
    /// not a coroutine, else the deepest included one. Paths that end in excluded frames below
    /// the same culprit make one report.
    fn culprits_of(&self, paths: &[Vec<u32>]) -> Vec<(usize, usize)> {
        let mut found: Vec<(usize, usize)> = Vec::new();
        let mut culprits_seen: HashSet<u32> = HashSet::new();
        for (p, path) in paths.iter().enumerate() {
            let node = |i: usize| &self.arena[path[i] as usize];
            let culprit = (0..path.len())
                .rev()
                .find(|&i| node(i).included && !node(i).is_coroutine)
                .or_else(|| (0..path.len()).rev().find(|&i| node(i).included));
            if let Some(culprit) = culprit {
                if culprits_seen.insert(path[culprit]) {
                    found.push((p, culprit));
                }
            }
        }
        found
    }

    /// The report of a unit over the threshold only because of collections or waits for the GIL
    /// (see `not_the_code`): those are the culprit, below the frames they interrupted, if the
    /// filters watch any. Its kind, stack and culprit.
    fn waited_report(
        &self,
        root_node: u32,
        cause: NotTheCode,
        (gc_generation, gc_ns): (Option<u8>, u64),
        (gil_holders, gil_wait_ns): (&[GilHolder], u64),
    ) -> Option<(EpisodeKind, Vec<StackFrame>, usize)> {
        let chain = self.best_chain(root_node);
        if !chain.iter().any(|&node| self.arena[node as usize].included) {
            return None;
        }
        let mut stack: Vec<StackFrame> = (0..chain.len())
            .map(|i| self.stack_frame(&chain, i, i + 1 == chain.len()))
            .collect();
        let (kind, frame) = waited_frame(cause, gc_generation, gc_ns, gil_holders, gil_wait_ns);
        stack.push(frame);
        let culprit = stack.len() - 1;
        Some((kind, stack, culprit))
    }

    fn stack_frame(&self, path: &[u32], i: usize, is_last: bool) -> StackFrame {
        let node = &self.arena[path[i] as usize];
        let line = |l: u32| (l != NO_LINE).then_some(l);
        // Where this frame called the next one down: on the path, or (for a culprit chosen above
        // frames the filters exclude, or that were not blameable) its best child.
        let next = path
            .get(i + 1)
            .copied()
            .or_else(|| self.best_child(path[i]));
        let call_line = next.map_or(NO_LINE, |next| self.arena[next as usize].called_from);
        let lineno = if !is_last {
            line(call_line).or(node.info.def_line)
        } else if node.is_coroutine {
            node.info.resume_line.or(node.info.def_line)
        } else if next.is_some() {
            // The culprit was chosen above deeper (excluded) frames: point at its call into them.
            line(call_line).or(node.info.def_line)
        } else {
            node.info.def_line
        };
        StackFrame {
            name: node.info.name.clone(),
            filename: node.info.filename.clone(),
            lineno,
            end_lineno: if node.is_coroutine {
                node.info.line_now
            } else {
                None
            },
            duration_ns: self.nanos(node.duration),
            is_c_call: node.is_c,
            is_coroutine: node.is_coroutine,
            included: node.included,
        }
    }

    /// A dispatcher spent long in a callback we never saw as a frame (a C function scheduled
    /// with `call_soon`): ask the binding what it was running.
    fn report_invisible_callback<R: Resolver>(
        &mut self,
        entry: &Entry,
        duration: Ticks,
        unseen: Ticks,
        r: &mut R,
    ) {
        // The Python dispatcher holding the callback: this entry, or the one below a C dispatcher.
        let holder = if entry.is_c {
            match self.stack.last() {
                Some(parent) if parent.role == Role::Dispatcher && !parent.is_c => parent.key,
                _ => return,
            }
        } else {
            entry.key
        };
        let Some((info, is_c)) = r.dispatched_callback(holder) else {
            return;
        };
        self.report_unseen_callback(info, is_c, entry.start, duration, unseen, r);
    }

    /// A loop implemented in C (uvloop) ran a callback from `start` to `now` in which no Python
    /// frame started (the binding tells its callbacks apart by the contexts the loop runs them
    /// in; see `units_started`): C code the loop called, a C function scheduled as a callback.
    /// Reported, as `info` names it, if it ran past the threshold and no unit runs now.
    pub fn c_loop_callback_ran<R: Resolver>(
        &mut self,
        info: FrameInfo,
        start: Ticks,
        now: Ticks,
        r: &mut R,
    ) {
        let duration = now.saturating_sub(start);
        if duration >= self.threshold && self.unit_root.is_none() {
            self.report_unseen_callback(info, true, start, duration, duration, r);
        }
    }

    /// Reports a callback no event was seen for, `unseen` of its `duration` from `start`.
    fn report_unseen_callback<R: Resolver>(
        &mut self,
        info: FrameInfo,
        is_c: bool,
        start: Ticks,
        duration: Ticks,
        unseen: Ticks,
        r: &mut R,
    ) {
        let included = self
            .filters
            .allows(&info.name, &info.module, info.filename.as_deref());
        if !included {
            return;
        }
        let end = start.saturating_add(duration);
        let cpu_wait_ns = self.cpu_wait_between(start, end, r);
        let gc = r.gc_within(start, end);
        let gc_ns = self.nanos(gc.ticks);
        let gil = r.gil_within(start, end);
        let gil_wait_ns = self.nanos(gil.ticks);
        let gil_holders = self.gil_holders(&gil, r);
        let mut stack = vec![StackFrame {
            name: info.name,
            filename: info.filename,
            lineno: info.def_line,
            end_lineno: None,
            duration_ns: self.nanos(unseen),
            is_c_call: is_c,
            is_coroutine: false,
            included,
        }];
        let threshold_ns = self.nanos(self.threshold);
        let waited = not_the_code(
            self.nanos(unseen),
            cpu_wait_ns,
            gc_ns,
            gil_wait_ns,
            threshold_ns,
        );
        let kind = if let Some(cause) = waited {
            // The callback ran over the threshold only because a collection ran inside it, or
            // it waited for the GIL.
            let (kind, frame) =
                waited_frame(cause, gc.generation, gc_ns, &gil_holders, gil_wait_ns);
            stack.push(frame);
            kind
        } else {
            EpisodeKind::Callback
        };
        self.finished.push(Episode {
            kind,
            duration_ns: self.nanos(duration),
            threshold_ns,
            cpu_wait_ns,
            gc_ns,
            gc_generation: gc.generation,
            gil_wait_ns,
            gil_holders,
            culprit: stack.len() - 1,
            stack,
            // The callback's context has been left: no task or scope.
            task_name: None,
            scope: None,
            reports_while_running: 0,
            episode_id: next_episode_id(),
            culprits: 1,
            share_ns: self.nanos(duration),
        });
    }

    fn nanos(&self, ticks: Ticks) -> u64 {
        (ticks as f64 * self.nanos_per_tick).round() as u64
    }

    /// The threads that held the GIL while the unit waited for it, named.
    fn gil_holders<R: Resolver>(&self, gil: &GilTime, r: &mut R) -> Vec<GilHolder> {
        if gil.holders.is_empty() {
            return Vec::new();
        }
        let idents: Vec<u64> = gil.holders.iter().map(|held| held.ident).collect();
        gil_holders(gil, &r.thread_names(&idents), self.nanos_per_tick)
    }
}
