//! What the tracker costs per profile event: the hot path, the general path it saves, a whole
//! task step under the threshold, and one step that crosses it. Every time reported is per event.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use loopwatch_core::{FilterSet, FrameInfo, FrameRef, Resolver, Tag, TaskInfo, Ticks, Tracker};

/// Far above anything a fast benchmark step lasts: only the slow step crosses it, on purpose.
const THRESHOLD: Ticks = 1_000;

// Keys of the frames in the scripts; the binding uses code and frame addresses.
const MODULE: u64 = 1;
const RUN_FOREVER: u64 = 2;
const RUN_ONCE: u64 = 3;
const HANDLE_RUN: u64 = 4;
const CONTEXT_RUN: u64 = 5;
const STEP: u64 = 6;
const CALL_A: u64 = 7;
const CALL_B: u64 = 8;
const C_LEN: u64 = 9;
const C_SLEEP: u64 = 10;
/// Keys `NESTED..NESTED + NESTING` are the nested chain.
const NESTED: u64 = 100;
const NESTING: u64 = 10;

/// Answers the slow path's questions with fixed names: what the tracker does with them is
/// measured, not how an interpreter finds them.
struct CheapResolver;

impl Resolver for CheapResolver {
    fn describe(&mut self, frame: FrameRef) -> FrameInfo {
        let (module, name) = match frame.key {
            STEP => ("app", "app.step"),
            C_SLEEP => ("time", "time.sleep"),
            _ => ("app", "app.work"),
        };
        FrameInfo {
            name: name.to_owned(),
            module: module.to_owned(),
            filename: (!frame.is_c).then(|| "app.py".to_owned()),
            def_line: (!frame.is_c).then_some(1),
            line_now: None,
            resume_line: None,
        }
    }

    fn current_line(&mut self, _key: u64) -> Option<u32> {
        Some(2)
    }

    fn dispatched_callback(&mut self, _dispatcher_key: u64) -> Option<(FrameInfo, bool)> {
        None
    }

    fn task(&mut self) -> TaskInfo {
        TaskInfo {
            name: Some("Task-1".to_owned()),
            scope: None,
        }
    }

    fn loop_is_running(&mut self) -> bool {
        true
    }
}

/// A tracker fed the way the binding feeds it, with a fake clock that advances one tick per event.
struct Feed {
    tracker: Tracker,
    resolver: CheapResolver,
    now: Ticks,
    /// Ticks that passed with no event: `now - waited` counts events at no cost per event.
    waited: Ticks,
}

impl Feed {
    fn new() -> Self {
        let no_filters = FilterSet::new::<[&str; 0], [&str; 0], &str, &str>([], []).unwrap();
        Self {
            tracker: Tracker::new(THRESHOLD, 1.0, no_filters),
            resolver: CheapResolver,
            now: 0,
            waited: 0,
        }
    }

    /// Each event is a separate hook call with Python running in between, so the tracker is
    /// hidden from the optimizer: no push may be folded into the pop that follows it.
    fn event(&mut self) -> (&mut Tracker, &mut CheapResolver, Ticks) {
        self.now += 1;
        (
            black_box(&mut self.tracker),
            &mut self.resolver,
            black_box(self.now),
        )
    }

    fn wait(&mut self, ticks: Ticks) {
        self.now += ticks;
        self.waited += ticks;
    }

    fn events(&self) -> u64 {
        self.now - self.waited
    }

    // The hot path alone.
    fn hot_push(&mut self, key: u64, is_c: bool) -> bool {
        let (tracker, _, now) = self.event();
        tracker.try_push_plain(black_box(key), Tag::PLAIN, is_c, now)
    }

    fn hot_pop(&mut self, key: u64, is_c: bool) -> bool {
        let (tracker, _, now) = self.event();
        tracker.try_pop_plain(black_box(key), is_c, now)
    }

    // The general path alone, as if the hot path did not exist.
    fn general_call(&mut self, key: u64) {
        let (tracker, resolver, now) = self.event();
        tracker.on_call(black_box(key), Tag::PLAIN, 0, now, resolver);
    }

    fn general_return(&mut self, key: u64) {
        let (tracker, resolver, now) = self.event();
        tracker.on_return(black_box(key), now, resolver);
    }

    // As the binding does: the hot path first, the general path when it declines.
    fn call(&mut self, key: u64, tag: Tag) {
        let (tracker, resolver, now) = self.event();
        if !tracker.try_push_plain(black_box(key), tag, false, now) {
            tracker.on_call(key, tag, 0, now, resolver);
        }
    }

    fn c_call(&mut self, key: u64, tag: Tag) {
        let (tracker, resolver, now) = self.event();
        if !tracker.try_push_plain(black_box(key), tag, true, now) {
            tracker.on_c_call(key, tag, now, resolver);
        }
    }

    fn ret(&mut self, key: u64) {
        let (tracker, resolver, now) = self.event();
        if !tracker.try_pop_plain(black_box(key), false, now) {
            tracker.on_return(key, now, resolver);
        }
    }

    fn c_ret(&mut self, key: u64) {
        let (tracker, resolver, now) = self.event();
        if !tracker.try_pop_plain(black_box(key), true, now) {
            tracker.on_c_return(key, now, resolver);
        }
    }

    /// `<module>` → `run_forever` → `_run_once`: the loop waits for its next callback.
    fn in_loop() -> Self {
        let mut feed = Self::new();
        feed.call(MODULE, Tag::PLAIN);
        feed.call(RUN_FOREVER, Tag::LOOP_RUN);
        feed.call(RUN_ONCE, Tag::PLAIN);
        feed
    }

    /// Inside a task step that never ends: where the hot path applies.
    fn in_step() -> Self {
        let mut feed = Self::in_loop();
        feed.call(HANDLE_RUN, Tag::DISPATCH);
        feed.c_call(CONTEXT_RUN, Tag::DISPATCH);
        feed.call(STEP, Tag::COROUTINE);
        assert!(feed.tracker.in_unit());
        feed
    }

    /// One task step from `Handle._run` to its return, blocking for `blocked` ticks in a C call:
    /// 14 events, the dispatcher's and the step's on the general path, the rest on the hot path.
    fn task_step(&mut self, blocked: Ticks) {
        self.call(HANDLE_RUN, Tag::DISPATCH);
        self.c_call(CONTEXT_RUN, Tag::DISPATCH);
        self.call(STEP, Tag::COROUTINE);
        self.call(CALL_A, Tag::PLAIN);
        self.call(CALL_B, Tag::PLAIN);
        self.ret(CALL_B);
        self.c_call(C_LEN, Tag::PLAIN);
        self.c_ret(C_LEN);
        self.c_call(C_SLEEP, Tag::PLAIN);
        self.wait(blocked);
        self.c_ret(C_SLEEP);
        self.ret(CALL_A);
        self.ret(STEP);
        self.c_ret(CONTEXT_RUN);
        self.ret(HANDLE_RUN);
    }
}

/// Runs `round` `iters` times on `feed` and scales the time taken so that criterion, which
/// divides by `iters`, reports the time per event fed rather than per round.
fn per_event(feed: &mut Feed, iters: u64, mut round: impl FnMut(&mut Feed)) -> Duration {
    let before = feed.events();
    let start = Instant::now();
    for _ in 0..iters {
        round(feed);
    }
    let elapsed = start.elapsed();
    let events = feed.events() - before;
    elapsed.mul_f64(iters as f64 / events.max(1) as f64)
}

fn hot_call_return(feed: &mut Feed, key: u64, is_c: bool) {
    let pushed = feed.hot_push(key, is_c);
    let popped = feed.hot_pop(key, is_c);
    black_box(pushed && popped);
}

fn hot_nested_calls_then_returns(feed: &mut Feed) {
    let mut taken = true;
    for key in NESTED..NESTED + NESTING {
        taken &= feed.hot_push(key, false);
    }
    for key in (NESTED..NESTED + NESTING).rev() {
        taken &= feed.hot_pop(key, false);
    }
    black_box(taken);
}

fn general_call_return(feed: &mut Feed) {
    feed.general_call(CALL_A);
    feed.general_return(CALL_A);
}

fn fast_step(feed: &mut Feed) {
    feed.task_step(0);
}

fn slow_step_and_its_episode(feed: &mut Feed) {
    feed.task_step(THRESHOLD);
    black_box(feed.tracker.take_episodes());
}

fn bench_hot_path(c: &mut Criterion) {
    for (name, key, is_c) in [
        ("hot_path/python_call_return", CALL_A, false),
        ("hot_path/c_call_return", C_LEN, true),
    ] {
        let mut feed = Feed::in_step();
        assert!(
            feed.hot_push(key, is_c) && feed.hot_pop(key, is_c),
            "{name}: the hot path declined, the bench would measure nothing"
        );
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                per_event(&mut feed, iters, |feed| hot_call_return(feed, key, is_c))
            });
        });
    }

    let mut feed = Feed::in_step();
    let depth = feed.tracker.depth();
    c.bench_function("hot_path/nested_10_calls_then_returns", |b| {
        b.iter_custom(|iters| per_event(&mut feed, iters, hot_nested_calls_then_returns));
    });
    assert_eq!(
        feed.tracker.depth(),
        depth,
        "every nested call was pushed and popped"
    );
}

fn bench_general_path(c: &mut Criterion) {
    let mut feed = Feed::in_step();
    c.bench_function("general_path/python_call_return", |b| {
        b.iter_custom(|iters| per_event(&mut feed, iters, general_call_return));
    });
}

fn bench_task_step(c: &mut Criterion) {
    let mut feed = Feed::in_loop();
    fast_step(&mut feed);
    assert!(!feed.tracker.has_episodes(), "a fast step reports nothing");
    c.bench_function("task_step/under_threshold", |b| {
        b.iter_custom(|iters| per_event(&mut feed, iters, fast_step));
    });

    let mut feed = Feed::in_loop();
    feed.task_step(THRESHOLD);
    assert_eq!(
        feed.tracker.take_episodes().len(),
        1,
        "a slow step is one episode"
    );
    c.bench_function("task_step/over_threshold_with_episode", |b| {
        b.iter_custom(|iters| per_event(&mut feed, iters, slow_step_and_its_episode));
    });
}

criterion_group!(benches, bench_hot_path, bench_general_path, bench_task_step);
criterion_main!(benches);
