//! A tiny simulator: scripted profile events with a fake clock and a fake interpreter.
#![allow(dead_code)] // each test binary uses a different part of the simulator

use std::collections::HashMap;

use loopwatch_core::{
    Episode, FilterSet, FrameInfo, FrameRef, GcLog, GcTime, Resolver, Tag, TaskInfo, Ticks, Tracker,
};

pub const THRESHOLD: Ticks = 20;

#[derive(Default)]
pub struct FakeInterpreter {
    pub names: HashMap<u64, &'static str>,
    pub lines: HashMap<u64, u32>,
    pub loop_running: bool,
    pub task: Option<&'static str>,
    pub scope: Option<u64>,
    pub dispatched: Option<&'static str>,
    pub described: usize,
    /// The thread's cumulative wait for a CPU, if the fake OS says.
    pub cpu_wait: Option<u64>,
    pub cpu_wait_reads: usize,
    /// The thread's garbage collections.
    pub gc: GcLog,
}

impl FakeInterpreter {
    fn info(&self, key: u64) -> FrameInfo {
        let name = self.names.get(&key).copied().unwrap_or("unknown.f");
        let module = name.rsplit_once('.').map_or(name, |(m, _)| m).to_owned();
        let is_c = name.starts_with("time.") || name.starts_with("builtins.");
        FrameInfo {
            name: name.to_owned(),
            module,
            filename: (!is_c).then(|| format!("/app/{key}.py")),
            def_line: (!is_c).then_some(key as u32 * 10),
            line_now: self.lines.get(&key).copied(),
            resume_line: None,
        }
    }
}

impl Resolver for FakeInterpreter {
    fn describe(&mut self, frame: FrameRef) -> FrameInfo {
        self.described += 1;
        let mut info = self.info(frame.key);
        if frame.resume > 0 {
            info.resume_line = Some(frame.resume as u32);
        }
        info
    }
    fn current_line(&mut self, key: u64) -> Option<u32> {
        self.lines.get(&key).copied()
    }
    fn dispatched_callback(&mut self, _key: u64) -> Option<(FrameInfo, bool)> {
        self.dispatched.map(|name| {
            let module = name.rsplit_once('.').unwrap().0.to_owned();
            (
                FrameInfo {
                    name: name.to_owned(),
                    module,
                    ..FrameInfo::default()
                },
                true,
            )
        })
    }
    fn task(&mut self) -> TaskInfo {
        TaskInfo {
            name: self.task.map(str::to_owned),
            scope: self.scope,
        }
    }
    fn loop_is_running(&mut self) -> bool {
        self.loop_running
    }
    fn cpu_wait_ns(&mut self) -> Option<u64> {
        self.cpu_wait_reads += 1;
        self.cpu_wait
    }
    fn gc_within(&mut self, from: Ticks, to: Ticks) -> GcTime {
        self.gc.within(from, to)
    }
}

pub struct Sim {
    pub tracker: Tracker,
    pub py: FakeInterpreter,
    pub now: Ticks,
    pub episodes: Vec<Episode>,
    /// Feed events only to the general path, skipping the hot path the binding tries first.
    pub general_only: bool,
    /// Events the hot path handled on its own.
    pub hot_hits: u64,
}

// Keys of well-known frames in scripts.
pub const MODULE: u64 = 1;
pub const RUN_FOREVER: u64 = 2;
pub const RUN_ONCE: u64 = 3;
pub const SELECT: u64 = 4;
pub const EPOLL: u64 = 5;
pub const HANDLE_RUN: u64 = 6;
pub const CONTEXT_RUN: u64 = 7;
pub const MAIN: u64 = 8;
pub const A: u64 = 9;
pub const B: u64 = 10;
pub const SLEEP: u64 = 11;
pub const INNER: u64 = 12;
pub const RUNNER: u64 = 13;
pub const LIB: u64 = 14;

impl Sim {
    pub fn new() -> Self {
        Self::with_filters(FilterSet::new::<[&str; 0], [&str; 0], &str, &str>([], []).unwrap())
    }

    pub fn with_filters(filters: FilterSet) -> Self {
        let mut py = FakeInterpreter::default();
        for (key, name) in [
            (MODULE, "__main__.<module>"),
            (RUN_FOREVER, "asyncio.base_events.BaseEventLoop.run_forever"),
            (RUN_ONCE, "asyncio.base_events.BaseEventLoop._run_once"),
            (SELECT, "selectors.EpollSelector.select"),
            (EPOLL, "select.epoll.poll"),
            (HANDLE_RUN, "asyncio.events.Handle._run"),
            (CONTEXT_RUN, "_contextvars.Context.run"),
            (MAIN, "app.main"),
            (A, "app.a"),
            (B, "app.b"),
            (SLEEP, "time.sleep"),
            (INNER, "app.inner"),
            (RUNNER, "asyncio.runners.Runner.run"),
            (LIB, "lib.helper"),
        ] {
            py.names.insert(key, name);
        }
        Self {
            tracker: Tracker::new(THRESHOLD, 1.0, filters),
            py,
            now: 0,
            episodes: Vec::new(),
            general_only: false,
            hot_hits: 0,
        }
    }

    fn collect(&mut self) -> &mut Self {
        self.episodes.extend(self.tracker.take_episodes());
        self
    }

    /// Tries the hot path first, as the binding does.
    fn hot(&mut self, attempt: impl FnOnce(&mut Tracker, Ticks) -> bool) -> bool {
        let handled = !self.general_only && attempt(&mut self.tracker, self.now);
        self.hot_hits += u64::from(handled);
        handled
    }

    pub fn call(&mut self, key: u64, tag: Tag) -> &mut Self {
        if !self.hot(|t, now| t.try_push_plain(key, tag, false, now)) {
            self.tracker.on_call(key, tag, 0, self.now, &mut self.py);
        }
        self.collect()
    }

    pub fn resume(&mut self, key: u64, line: i32) -> &mut Self {
        self.tracker
            .on_call(key, Tag::COROUTINE, line, self.now, &mut self.py);
        self.collect()
    }

    pub fn c_call(&mut self, key: u64, tag: Tag) -> &mut Self {
        if !self.hot(|t, now| t.try_push_plain(key, tag, true, now)) {
            self.tracker.on_c_call(key, tag, self.now, &mut self.py);
        }
        self.collect()
    }

    pub fn ret(&mut self, key: u64) -> &mut Self {
        if !self.hot(|t, now| t.try_pop_plain(key, false, now)) {
            self.tracker.on_return(key, self.now, &mut self.py);
        }
        self.collect()
    }

    pub fn c_ret(&mut self, key: u64) -> &mut Self {
        if !self.hot(|t, now| t.try_pop_plain(key, true, now)) {
            self.tracker.on_c_return(key, self.now, &mut self.py);
        }
        self.collect()
    }

    pub fn advance(&mut self, ticks: Ticks) -> &mut Self {
        self.now += ticks;
        self
    }

    /// A garbage collection of `generation` runs for `ticks`.
    pub fn collect_garbage(&mut self, generation: u8, ticks: Ticks) -> &mut Self {
        self.py.gc.start(self.now, generation);
        self.now += ticks;
        self.py.gc.stop(self.now);
        self
    }

    /// Time passes with the thread ready to run but given no CPU.
    pub fn wait_for_cpu(&mut self, ticks: Ticks) -> &mut Self {
        self.now += ticks;
        if let Some(waited) = self.py.cpu_wait.as_mut() {
            *waited += ticks;
        }
        self
    }

    pub fn line(&mut self, key: u64, line: u32) -> &mut Self {
        self.py.lines.insert(key, line);
        self
    }

    /// This process forks, and the sim goes on as the child.
    pub fn fork_child(&mut self) -> &mut Self {
        self.tracker.forget_the_parent();
        self
    }

    pub fn flush(&mut self) -> &mut Self {
        self.tracker.flush(self.now, &mut self.py);
        self.collect()
    }

    /// `<module>` → `run_forever` → `_run_once` → `Handle._run` → `Context.run`: ready to run a callback.
    pub fn enter_dispatch(&mut self) -> &mut Self {
        self.call(MODULE, Tag::PLAIN)
            .call(RUN_FOREVER, Tag::LOOP_RUN)
            .call(RUN_ONCE, Tag::PLAIN)
            .call(HANDLE_RUN, Tag::DISPATCH)
            .c_call(CONTEXT_RUN, Tag::DISPATCH)
    }

    pub fn leave_dispatch(&mut self) -> &mut Self {
        self.c_ret(CONTEXT_RUN).ret(HANDLE_RUN)
    }

    /// A loop implemented in C (uvloop) enters a callback's context (as the binding sees it):
    /// when and how many units had started, for `c_loop_callback`.
    pub fn c_loop_enters(&mut self) -> (Ticks, u64) {
        self.tracker.hosts_a_c_loop();
        (self.now, self.tracker.units_started())
    }

    /// The C loop leaves the callback's context entered at `start`, with `units_before` units
    /// started before it (`c_loop_enters`).
    pub fn c_loop_callback(&mut self, start: Ticks, units_before: u64) -> &mut Self {
        if self.tracker.units_started() == units_before {
            let info = FrameInfo {
                name: "a C function called back by uvloop.Loop".into(),
                module: String::new(),
                ..FrameInfo::default()
            };
            self.tracker
                .c_loop_callback_ran(info, start, self.now, &mut self.py);
        }
        self.collect()
    }

    pub fn names(&self, episode: usize) -> Vec<&str> {
        self.episodes[episode]
            .stack
            .iter()
            .map(|f| f.name.as_str())
            .collect()
    }
}
