//! The tracker's semantics on scripted event sequences: what is one episode, who is the culprit,
//! and what is never reported.

mod sim;

use loopwatch_core::{EpisodeKind, FilterSet, Tag};
use sim::*;

#[test]
fn nested_sync_calls_make_one_report_naming_the_deepest_call() {
    let mut s = Sim::new();
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .line(MAIN, 5)
        .call(A, Tag::PLAIN)
        .line(A, 91)
        .call(B, Tag::PLAIN)
        .line(B, 101)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(50)
        .c_ret(SLEEP)
        .advance(2)
        .ret(B)
        .ret(A)
        .advance(1)
        .ret(MAIN)
        .leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
    let e = &s.episodes[0];
    assert_eq!(e.kind, EpisodeKind::Call);
    assert_eq!(s.names(0), ["app.main", "app.a", "app.b", "time.sleep"]);
    assert_eq!(e.culprit_frame().name, "time.sleep");
    assert_eq!(e.duration_ns, 53);
    let durations: Vec<u64> = e.stack.iter().map(|f| f.duration_ns).collect();
    assert_eq!(durations, [53, 52, 52, 50]);
    // Each caller points at the line where it made the call; the C culprit is located at its caller.
    let lines: Vec<Option<u32>> = e.stack.iter().map(|f| f.lineno).collect();
    assert_eq!(lines, [Some(5), Some(91), Some(101), None]);
    assert_eq!(e.location(), (Some("/app/10.py"), Some(101)));
}

#[test]
fn the_loops_idle_wait_is_never_reported() {
    let mut s = Sim::new();
    s.call(MODULE, Tag::PLAIN)
        .call(RUN_FOREVER, Tag::LOOP_RUN)
        .call(RUN_ONCE, Tag::PLAIN)
        .call(SELECT, Tag::PLAIN)
        .c_call(EPOLL, Tag::PLAIN)
        .advance(1000)
        .c_ret(EPOLL)
        .ret(SELECT)
        .ret(RUN_ONCE);
    assert!(s.episodes.is_empty());
    assert_eq!(s.py.described, 0, "nothing outside a unit is even named");
}

#[test]
fn code_outside_a_running_loop_is_not_reported() {
    let mut s = Sim::new();
    s.call(MODULE, Tag::PLAIN)
        .call(A, Tag::PLAIN)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(100)
        .c_ret(SLEEP)
        .ret(A);
    assert!(s.episodes.is_empty());
}

#[test]
fn a_slow_sync_callback_is_a_callback() {
    let mut s = Sim::new();
    s.enter_dispatch()
        .call(A, Tag::PLAIN)
        .advance(30)
        .ret(A)
        .leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
    assert_eq!(s.episodes[0].kind, EpisodeKind::Callback);
    assert_eq!(s.names(0), ["app.a"]);
    assert_eq!(
        s.episodes[0].stack[0].lineno,
        Some(90),
        "a blocking function points at its definition"
    );
}

#[test]
fn a_step_with_no_single_slow_call_names_the_coroutine_and_its_lines() {
    let mut s = Sim::new();
    s.enter_dispatch().resume(MAIN, 7);
    for _ in 0..10 {
        s.call(A, Tag::PLAIN).advance(5).ret(A);
    }
    s.line(MAIN, 12).ret(MAIN).leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
    let e = &s.episodes[0];
    assert_eq!(e.kind, EpisodeKind::Step);
    assert_eq!(e.culprit_frame().name, "app.main");
    assert_eq!(e.culprit_frame().lineno, Some(7));
    assert_eq!(e.culprit_frame().end_lineno, Some(12));
    assert_eq!(e.duration_ns, 50);
}

#[test]
fn an_inner_awaited_coroutine_is_the_step_culprit_and_the_await_chain_is_kept() {
    let mut s = Sim::new();
    s.enter_dispatch()
        .resume(MAIN, 3)
        .line(MAIN, 4)
        .resume(INNER, 20)
        .advance(40)
        .line(INNER, 22)
        .ret(INNER)
        .ret(MAIN)
        .leave_dispatch();
    assert_eq!(s.names(0), ["app.main", "app.inner"]);
    assert_eq!(s.episodes[0].kind, EpisodeKind::Step);
    assert_eq!(s.episodes[0].stack[0].lineno, Some(4));
    assert_eq!(s.episodes[0].stack[1].lineno, Some(20));
}

#[test]
fn each_of_several_slow_calls_in_one_step_is_its_own_report_in_the_order_they_ran() {
    let mut s = Sim::new();
    s.enter_dispatch().call(MAIN, Tag::COROUTINE);
    for ticks in [25, 40, 30] {
        s.c_call(SLEEP, Tag::PLAIN).advance(ticks).c_ret(SLEEP);
    }
    s.ret(MAIN).leave_dispatch();
    assert_eq!(s.episodes.len(), 3);
    let own: Vec<u64> = s
        .episodes
        .iter()
        .map(|e| e.culprit_frame().duration_ns)
        .collect();
    assert_eq!(own, [25, 40, 30]);
    for e in &s.episodes {
        // The loop was blocked once: every report says for how long, and what part is its own.
        assert_eq!(e.duration_ns, 95);
        assert_eq!(e.culprits, 3);
        assert_eq!(e.episode_id, s.episodes[0].episode_id);
        assert_eq!(e.kind, EpisodeKind::Call);
    }
    let shares: Vec<u64> = s.episodes.iter().map(|e| e.share_ns).collect();
    assert_eq!(shares, [25, 40, 30]);
}

#[test]
fn thousands_of_slow_calls_in_one_step_are_each_reported_once_with_their_share() {
    let mut s = Sim::new();
    s.enter_dispatch().call(MAIN, Tag::COROUTINE);
    for i in 0..5000 {
        s.c_call(SLEEP, Tag::PLAIN).advance(21 + i % 3).c_ret(SLEEP);
    }
    s.ret(MAIN).leave_dispatch();
    assert_eq!(s.episodes.len(), 5000);
    let shares: Vec<u64> = s.episodes.iter().map(|e| e.share_ns).collect();
    assert_eq!(shares, (0..5000).map(|i| 21 + i % 3).collect::<Vec<u64>>());
    assert!(s.episodes.iter().all(|e| e.culprits == 5000));
}

#[test]
fn two_functions_that_each_block_in_one_step_are_each_named_at_their_own_call() {
    // a() then b(), each calling time.sleep over the threshold, with no await between them.
    let mut s = Sim::new();
    s.enter_dispatch().call(MAIN, Tag::COROUTINE).line(MAIN, 5);
    s.call(A, Tag::PLAIN)
        .line(A, 91)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(60)
        .c_ret(SLEEP)
        .ret(A);
    s.line(MAIN, 6);
    s.call(B, Tag::PLAIN)
        .line(B, 101)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(60)
        .c_ret(SLEEP)
        .ret(B);
    s.advance(1).ret(MAIN).leave_dispatch();
    assert_eq!(s.episodes.len(), 2);
    assert_eq!(s.names(0), ["app.main", "app.a", "time.sleep"]);
    assert_eq!(s.names(1), ["app.main", "app.b", "time.sleep"]);
    let lines =
        |e: usize| -> Vec<Option<u32>> { s.episodes[e].stack.iter().map(|f| f.lineno).collect() };
    assert_eq!(lines(0), [Some(5), Some(91), None]);
    assert_eq!(lines(1), [Some(6), Some(101), None]);
    assert_eq!(s.episodes[0].location(), (Some("/app/9.py"), Some(91)));
    assert_eq!(s.episodes[1].location(), (Some("/app/10.py"), Some(101)));
    assert_eq!([s.episodes[0].share_ns, s.episodes[1].share_ns], [60, 60]);
    assert_eq!(
        [s.episodes[0].duration_ns, s.episodes[1].duration_ns],
        [121, 121]
    );
}

#[test]
fn a_call_over_the_threshold_beside_a_shorter_one_is_the_only_report() {
    let mut s = Sim::new();
    s.enter_dispatch().call(MAIN, Tag::COROUTINE);
    s.call(A, Tag::PLAIN).advance(15).ret(A);
    s.call(B, Tag::PLAIN).advance(30).ret(B);
    s.ret(MAIN).leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
    assert_eq!(s.names(0), ["app.main", "app.b"]);
    assert_eq!((s.episodes[0].culprits, s.episodes[0].share_ns), (1, 45));
}

#[test]
fn sibling_calls_are_not_culprits_when_only_the_wait_for_a_cpu_made_them_long() {
    let mut s = Sim::new();
    s.py.cpu_wait = Some(0);
    s.enter_dispatch().call(MAIN, Tag::COROUTINE);
    for _ in 0..2 {
        // 25 ticks each, 10 of them waiting for a CPU: 15 of their own, under the threshold.
        s.call(A, Tag::PLAIN).advance(15).wait_for_cpu(10).ret(A);
    }
    s.ret(MAIN).leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
    assert_eq!(s.episodes[0].kind, EpisodeKind::Step);
    assert_eq!(s.names(0), ["app.main"]);
}

#[test]
fn calls_nested_under_one_of_two_slow_siblings_stay_in_its_one_report() {
    let mut s = Sim::new();
    s.enter_dispatch().call(MAIN, Tag::COROUTINE);
    s.call(A, Tag::PLAIN)
        .call(B, Tag::PLAIN)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(40);
    s.c_ret(SLEEP).ret(B).ret(A);
    s.call(LIB, Tag::PLAIN).advance(30).ret(LIB);
    s.ret(MAIN).leave_dispatch();
    assert_eq!(s.episodes.len(), 2);
    assert_eq!(s.names(0), ["app.main", "app.a", "app.b", "time.sleep"]);
    assert_eq!(s.names(1), ["app.main", "lib.helper"]);
}

#[test]
fn excluded_siblings_under_one_included_call_make_one_report_of_it() {
    let filters = FilterSet::new::<[&str; 0], _, &str, _>([], ["time"]).unwrap();
    let mut s = Sim::with_filters(filters);
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .call(A, Tag::PLAIN)
        .line(A, 93);
    for _ in 0..2 {
        s.c_call(SLEEP, Tag::PLAIN).advance(30).c_ret(SLEEP);
    }
    s.ret(A).call(B, Tag::PLAIN).advance(25).ret(B);
    s.ret(MAIN).leave_dispatch();
    let culprits: Vec<&str> = s
        .episodes
        .iter()
        .map(|e| e.culprit_frame().name.as_str())
        .collect();
    assert_eq!(culprits, ["app.a", "app.b"]);
    assert_eq!(
        s.episodes[0].culprit_frame().lineno,
        Some(93),
        "a points at its call into sleep"
    );
    assert_eq!([s.episodes[0].share_ns, s.episodes[1].share_ns], [60, 25]);
}

#[test]
fn each_step_is_its_own_episode() {
    let mut s = Sim::new();
    for _ in 0..3 {
        s.enter_dispatch()
            .call(MAIN, Tag::COROUTINE)
            .c_call(SLEEP, Tag::PLAIN)
            .advance(30)
            .c_ret(SLEEP)
            .ret(MAIN)
            .leave_dispatch()
            .ret(RUN_ONCE)
            .ret(RUN_FOREVER)
            .ret(MODULE);
    }
    assert_eq!(s.episodes.len(), 3);
}

#[test]
fn a_c_function_scheduled_as_a_callback_is_named_through_its_dispatcher() {
    let mut s = Sim::new();
    s.py.dispatched = Some("time.sleep");
    s.enter_dispatch().advance(60).leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
    assert_eq!(s.episodes[0].kind, EpisodeKind::Callback);
    assert_eq!(s.names(0), ["time.sleep"]);
    assert!(s.episodes[0].stack[0].is_c_call);
}

#[test]
fn a_dispatcher_whose_callback_was_visible_reports_nothing_more() {
    let mut s = Sim::new();
    s.py.dispatched = Some("time.sleep");
    s.enter_dispatch()
        .call(A, Tag::PLAIN)
        .advance(60)
        .ret(A)
        .leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
    assert_eq!(s.names(0), ["app.a"]);
}

#[test]
fn a_c_function_a_c_loop_calls_back_with_no_python_frame_is_a_callback_of_its_own() {
    let mut s = Sim::new();
    s.py.loop_running = true;
    s.call(MODULE, Tag::PLAIN).call(RUNNER, Tag::PLAIN);
    // uvloop enters the callback's context, runs `time.sleep` from C, and leaves it.
    let (start, units) = s.c_loop_enters();
    s.advance(60).c_loop_callback(start, units);
    assert_eq!(s.episodes.len(), 1);
    assert_eq!(s.episodes[0].kind, EpisodeKind::Callback);
    assert_eq!(s.names(0), ["a C function called back by uvloop.Loop"]);
    assert!(s.episodes[0].stack[0].is_c_call);
    assert_eq!(s.episodes[0].duration_ns, 60);
    // One under the threshold is nothing.
    let (start, units) = s.c_loop_enters();
    s.advance(5).c_loop_callback(start, units);
    assert_eq!(s.episodes.len(), 1);
}

#[test]
fn a_c_loop_callback_that_ran_python_is_judged_by_its_frames_only() {
    let mut s = Sim::new();
    s.py.loop_running = true;
    s.call(MODULE, Tag::PLAIN).call(RUNNER, Tag::PLAIN);
    let (start, units) = s.c_loop_enters();
    s.call(A, Tag::PLAIN).advance(60).ret(A);
    s.c_loop_callback(start, units);
    assert_eq!(s.episodes.len(), 1, "the frame's report, not a second one");
    assert_eq!(s.names(0), ["app.a"]);
    assert_eq!(
        s.episodes[0].kind,
        EpisodeKind::Callback,
        "a protocol's callback, no task yet"
    );
    // A short Python callback leaves the C loop's callback unreported too, however long the
    // context was entered (the rest is the loop's own bookkeeping).
    let (start, units) = s.c_loop_enters();
    s.call(A, Tag::PLAIN).advance(5).ret(A).advance(60);
    s.c_loop_callback(start, units);
    assert_eq!(s.episodes.len(), 1);
}

#[test]
fn a_python_loops_dispatch_is_told_from_a_c_loops_callback() {
    let mut s = Sim::new();
    assert!(!s.tracker.dispatching());
    s.enter_dispatch();
    // asyncio's `Context.run` is about to run the callback: the context it enters is its own.
    assert!(s.tracker.dispatching());
    s.call(A, Tag::PLAIN);
    assert!(!s.tracker.dispatching(), "inside the callback's unit");
    s.ret(A).leave_dispatch();
}

#[test]
fn a_c_loop_hosting_task_steps_is_found_from_the_first_step() {
    let mut s = Sim::new();
    s.py.loop_running = true;
    s.call(MODULE, Tag::PLAIN).call(RUNNER, Tag::PLAIN);
    // uvloop runs the loop inside one invisible C call: steps arrive right under Runner.run.
    s.call(MAIN, Tag::COROUTINE)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(30)
        .c_ret(SLEEP)
        .ret(MAIN);
    s.call(A, Tag::PLAIN).advance(30).ret(A);
    assert_eq!(s.episodes.len(), 2);
    assert_eq!(s.episodes[0].kind, EpisodeKind::Call);
    assert_eq!(s.episodes[1].kind, EpisodeKind::Callback);
    // Once the loop has stopped, code under the same frame is no longer a callback.
    s.py.loop_running = false;
    s.call(A, Tag::PLAIN).advance(30).ret(A);
    assert_eq!(s.episodes.len(), 2);
}

#[test]
fn a_coroutine_driven_outside_any_loop_is_not_a_step() {
    let mut s = Sim::new();
    s.call(MODULE, Tag::PLAIN)
        .call(MAIN, Tag::COROUTINE)
        .advance(50)
        .ret(MAIN);
    assert!(s.episodes.is_empty());
}

#[test]
fn returns_of_frames_never_seen_are_ignored() {
    let mut s = Sim::new();
    s.ret(MAIN).c_ret(CONTEXT_RUN).ret(HANDLE_RUN).ret(RUN_ONCE);
    assert_eq!(s.tracker.depth(), 0);
    s.enter_dispatch()
        .call(A, Tag::PLAIN)
        .advance(30)
        .ret(A)
        .leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
}

#[test]
fn monitoring_started_inside_a_step_times_from_the_start() {
    let mut s = Sim::new();
    s.advance(1000);
    let seed = [
        (MODULE, Tag::PLAIN, 0),
        (RUN_FOREVER, Tag::LOOP_RUN, 0),
        (RUN_ONCE, Tag::PLAIN, 0),
        (HANDLE_RUN, Tag::DISPATCH, 0),
        (MAIN, Tag::COROUTINE, 0),
    ];
    s.tracker.seed(&seed, s.now, &mut s.py);
    s.c_call(SLEEP, Tag::PLAIN)
        .advance(30)
        .c_ret(SLEEP)
        .ret(MAIN);
    // Context.run was invisible to the frame walk: its return matches nothing and is ignored.
    s.c_ret(CONTEXT_RUN).ret(HANDLE_RUN);
    assert_eq!(s.episodes.len(), 1);
    assert_eq!(s.episodes[0].duration_ns, 30);
    assert_eq!(s.tracker.depth(), 3);
}

#[test]
fn flush_reports_the_running_step_once_and_restarts_its_clock() {
    let mut s = Sim::new();
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(30)
        .c_ret(SLEEP)
        .advance(5);
    s.flush();
    assert_eq!(s.episodes.len(), 1);
    assert_eq!(s.episodes[0].culprit_frame().name, "time.sleep");
    assert_eq!(s.episodes[0].duration_ns, 35);
    s.advance(5).ret(MAIN).leave_dispatch();
    assert_eq!(
        s.episodes.len(),
        1,
        "the rest of the step is short and nothing is repeated"
    );
}

#[test]
fn flush_between_steps_reports_nothing() {
    let mut s = Sim::new();
    s.call(MODULE, Tag::PLAIN)
        .call(RUN_FOREVER, Tag::LOOP_RUN)
        .advance(100)
        .flush();
    assert!(s.episodes.is_empty());
}

#[test]
fn excluded_frames_are_never_blamed_and_the_culprit_moves_up() {
    let filters = FilterSet::new::<[&str; 0], _, &str, _>([], ["time"]).unwrap();
    let mut s = Sim::with_filters(filters);
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .call(A, Tag::PLAIN)
        .line(A, 93)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(30)
        .c_ret(SLEEP)
        .ret(A)
        .ret(MAIN)
        .leave_dispatch();
    assert_eq!(
        s.names(0),
        ["app.main", "app.a"],
        "the stack ends at the culprit"
    );
    assert_eq!(s.episodes[0].culprit_frame().lineno, Some(93));
}

#[test]
fn a_blameable_call_beats_a_longer_excluded_one() {
    let mut s = Sim::with_filters(FilterSet::new(["app"], [] as [&str; 0]).unwrap());
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .call(LIB, Tag::PLAIN)
        .advance(60)
        .ret(LIB)
        .call(A, Tag::PLAIN)
        .advance(25)
        .ret(A)
        .ret(MAIN)
        .leave_dispatch();
    assert_eq!(s.episodes[0].culprit_frame().name, "app.a");
}

#[test]
fn an_episode_with_no_included_frame_is_dropped() {
    let mut s = Sim::with_filters(FilterSet::new(["nothing_here"], [] as [&str; 0]).unwrap());
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(30)
        .c_ret(SLEEP)
        .ret(MAIN);
    assert!(s.episodes.is_empty());
}

#[test]
fn recursion_of_one_c_function_pairs_returns_innermost_first() {
    let mut s = Sim::new();
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(5)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(25)
        .c_ret(SLEEP)
        .c_ret(SLEEP)
        .ret(MAIN)
        .leave_dispatch();
    let durations: Vec<u64> = s.episodes[0].stack.iter().map(|f| f.duration_ns).collect();
    assert_eq!(durations, [30, 30, 25]);
}

#[test]
fn a_missing_c_return_drops_the_lost_frame_without_a_false_report() {
    let mut s = Sim::new();
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .call(A, Tag::PLAIN)
        .c_call(SLEEP, Tag::PLAIN);
    // The C function's return never arrives; the frame that called it returns much later.
    s.advance(5).ret(A).ret(MAIN).leave_dispatch();
    assert!(s.episodes.is_empty());
    assert_eq!(s.tracker.depth(), 3);
}

#[test]
fn a_generator_resumed_at_another_depth_is_timed_per_resume() {
    const GEN: u64 = 40;
    let mut s = Sim::new();
    s.enter_dispatch().call(MAIN, Tag::COROUTINE);
    s.call(GEN, Tag::PLAIN).advance(5).ret(GEN);
    s.call(A, Tag::PLAIN)
        .call(B, Tag::PLAIN)
        .call(GEN, Tag::PLAIN)
        .advance(25)
        .ret(GEN)
        .ret(B)
        .ret(A);
    s.ret(MAIN).leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
    assert_eq!(s.episodes[0].stack.last().unwrap().duration_ns, 25);
    assert_eq!(s.tracker.depth(), 3);
}

#[test]
fn task_name_and_scope_are_taken_while_the_step_runs() {
    let mut s = Sim::new();
    s.py.task = Some("Task-7");
    s.py.scope = Some(42);
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(30)
        .c_ret(SLEEP);
    s.py.task = None;
    s.py.scope = None;
    s.ret(MAIN).leave_dispatch();
    assert_eq!(s.episodes[0].task_name.as_deref(), Some("Task-7"));
    assert_eq!(s.episodes[0].scope, Some(42));
}

#[test]
fn each_step_carries_the_scope_of_its_own_task() {
    let mut s = Sim::new();
    for scope in [Some(1), None, Some(2)] {
        s.py.scope = scope;
        s.enter_dispatch()
            .call(MAIN, Tag::COROUTINE)
            .c_call(SLEEP, Tag::PLAIN)
            .advance(30)
            .c_ret(SLEEP)
            .ret(MAIN)
            .leave_dispatch();
    }
    let scopes: Vec<Option<u64>> = s.episodes.iter().map(|e| e.scope).collect();
    assert_eq!(scopes, [Some(1), None, Some(2)]);
}

#[test]
fn fast_units_cost_no_names() {
    let mut s = Sim::new();
    for _ in 0..100 {
        s.enter_dispatch()
            .call(MAIN, Tag::COROUTINE)
            .call(A, Tag::PLAIN)
            .advance(1)
            .ret(A)
            .ret(MAIN)
            .leave_dispatch();
    }
    assert!(s.episodes.is_empty());
    assert_eq!(s.py.described, 0);
}

#[test]
fn short_calls_inside_a_step_never_leave_the_hot_path() {
    let mut s = Sim::new();
    s.enter_dispatch().call(MAIN, Tag::COROUTINE);
    let before = s.hot_hits;
    for _ in 0..1000 {
        s.call(A, Tag::PLAIN)
            .c_call(SLEEP, Tag::PLAIN)
            .c_ret(SLEEP)
            .ret(A);
    }
    assert_eq!(s.hot_hits - before, 4000);
    s.ret(MAIN).leave_dispatch();
    assert!(s.episodes.is_empty());
    assert_eq!(s.py.described, 0);
}

fn sim_with_cpu_wait() -> Sim {
    let mut s = Sim::new();
    s.py.cpu_wait = Some(1_000);
    s
}

#[test]
fn a_step_over_the_threshold_only_by_waiting_for_a_cpu_is_starved_not_blamed() {
    let mut s = sim_with_cpu_wait();
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .call(A, Tag::PLAIN)
        .advance(2)
        .wait_for_cpu(25)
        .advance(3)
        .ret(A)
        .ret(MAIN)
        .leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
    let e = &s.episodes[0];
    assert_eq!((e.duration_ns, e.cpu_wait_ns, e.own_time_ns()), (30, 25, 5));
    assert!(e.starved());
}

#[test]
fn a_real_block_keeps_its_wall_time_and_says_how_much_was_waiting() {
    let mut s = sim_with_cpu_wait();
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(30)
        .wait_for_cpu(10)
        .c_ret(SLEEP)
        .ret(MAIN)
        .leave_dispatch();
    let e = &s.episodes[0];
    assert_eq!(e.culprit_frame().name, "time.sleep");
    assert_eq!((e.duration_ns, e.cpu_wait_ns), (40, 10));
    assert!(!e.starved());
}

#[test]
fn a_quick_call_that_waited_for_a_cpu_is_not_the_culprit() {
    let mut s = sim_with_cpu_wait();
    // A runs 25 ticks of its own, then a tiny C call inside it waits 25 for a CPU: the call is
    // over the threshold by wall time only; A is what really held the loop.
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .call(A, Tag::PLAIN)
        .advance(25)
        .c_call(SLEEP, Tag::PLAIN)
        .wait_for_cpu(25)
        .c_ret(SLEEP)
        .ret(A)
        .ret(MAIN)
        .leave_dispatch();
    let e = &s.episodes[0];
    assert_eq!(e.culprit_frame().name, "app.a");
    assert_eq!((e.duration_ns, e.cpu_wait_ns), (50, 25));
    assert!(!e.starved());
}

#[test]
fn waiting_for_a_cpu_before_a_step_is_not_taken_off_it() {
    let mut s = sim_with_cpu_wait();
    // A first callback leaves a fresh reading behind; then the thread waits in the loop's own
    // machinery, between callbacks.
    s.enter_dispatch()
        .call(A, Tag::PLAIN)
        .advance(1)
        .ret(A)
        .leave_dispatch()
        .wait_for_cpu(50)
        .call(HANDLE_RUN, Tag::DISPATCH)
        .c_call(CONTEXT_RUN, Tag::DISPATCH)
        .call(B, Tag::PLAIN)
        .advance(25)
        .ret(B)
        .leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
    assert_eq!(s.episodes[0].cpu_wait_ns, 0);
    assert!(!s.episodes[0].starved());
}

#[test]
fn the_cpu_wait_is_read_at_most_once_per_mark_age_and_once_per_episode() {
    let mut s = sim_with_cpu_wait();
    s.enter_dispatch().leave_dispatch();
    let first = s.py.cpu_wait_reads;
    assert_eq!(first, 1);
    // Twenty quick callbacks within the mark's age (an eighth of the threshold): no new read.
    for _ in 0..20 {
        s.call(HANDLE_RUN, Tag::DISPATCH)
            .c_call(CONTEXT_RUN, Tag::DISPATCH)
            .call(A, Tag::PLAIN)
            .ret(A)
            .leave_dispatch();
    }
    assert_eq!(s.py.cpu_wait_reads, first);
    // One slow one: a fresh mark at its start, and one read when it becomes an episode.
    s.advance(10)
        .call(HANDLE_RUN, Tag::DISPATCH)
        .c_call(CONTEXT_RUN, Tag::DISPATCH)
        .call(A, Tag::PLAIN)
        .advance(30)
        .ret(A)
        .leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
    assert_eq!(s.py.cpu_wait_reads, first + 2);
}

#[test]
fn where_the_os_does_not_say_nothing_is_taken_off_and_it_is_asked_once() {
    let mut s = Sim::new();
    for _ in 0..3 {
        s.enter_dispatch()
            .call(A, Tag::PLAIN)
            .wait_for_cpu(30)
            .ret(A)
            .leave_dispatch();
    }
    assert_eq!(s.episodes.len(), 3);
    assert!(s
        .episodes
        .iter()
        .all(|e| e.cpu_wait_ns == 0 && !e.starved()));
    assert_eq!(s.py.cpu_wait_reads, 1);
}

#[test]
fn a_forked_child_never_reports_the_parents_step_and_reports_its_own_loop() {
    let mut s = Sim::new();
    // The parent's step has blocked 30 ticks when it forks (multiprocessing's fork start method).
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(30)
        .c_ret(SLEEP)
        .call(A, Tag::PLAIN)
        .fork_child();
    // The child runs a loop of its own from inside the parent's frames, blocks 25 ticks in one
    // step, and unwinds through the parent's frames on its way out.
    s.call(RUNNER, Tag::PLAIN)
        .enter_dispatch()
        .call(INNER, Tag::COROUTINE)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(25)
        .c_ret(SLEEP)
        .ret(INNER)
        .leave_dispatch()
        .ret(RUN_ONCE)
        .ret(RUN_FOREVER)
        .ret(MODULE)
        .ret(RUNNER)
        .advance(40)
        .ret(A)
        .ret(MAIN)
        .leave_dispatch();
    assert_eq!(s.episodes.len(), 1, "only the child's own step");
    assert_eq!(s.names(0), ["app.inner", "time.sleep"]);
    assert_eq!(s.episodes[0].duration_ns, 25);
}

#[test]
fn the_running_units_start_is_known_while_it_runs_and_changes_only_off_the_hot_path() {
    let mut s = Sim::new();
    s.enter_dispatch();
    assert_eq!(
        s.tracker.unit_started_at(),
        None,
        "the loop's machinery is no unit"
    );
    s.advance(3).call(MAIN, Tag::COROUTINE);
    assert_eq!(s.tracker.unit_started_at(), Some(s.now));
    let started = s.now;
    // Short calls inside the step leave it as it is.
    s.advance(1)
        .call(A, Tag::PLAIN)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(2);
    s.c_ret(SLEEP).ret(A);
    assert_eq!(s.tracker.unit_started_at(), Some(started));
    // A flush times the step afresh from now: a watchdog sees a new stall.
    s.advance(5).flush();
    assert_eq!(s.tracker.unit_started_at(), Some(s.now));
    s.ret(MAIN);
    assert_eq!(s.tracker.unit_started_at(), None);
    s.leave_dispatch();
}

#[test]
fn a_step_over_the_threshold_only_because_of_a_collection_names_the_collection() {
    let mut s = Sim::new();
    // A runs 5 ticks of its own; a generation-2 collection inside it takes 40.
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .call(A, Tag::PLAIN)
        .advance(3)
        .collect_garbage(2, 40)
        .advance(2)
        .ret(A)
        .ret(MAIN)
        .leave_dispatch();
    assert_eq!(s.episodes.len(), 1);
    let e = &s.episodes[0];
    assert_eq!(e.kind, EpisodeKind::Gc);
    assert_eq!(e.culprit_frame().name, "garbage collection (generation 2)");
    assert_eq!((e.duration_ns, e.gc_ns, e.gc_generation), (45, 40, Some(2)));
    assert_eq!(e.culprit_frame().duration_ns, 40);
    // The frames it interrupted say where: the step, then A.
    assert_eq!(
        s.names(0),
        ["app.main", "app.a", "garbage collection (generation 2)"]
    );
    assert_eq!(e.location(), (Some("/app/9.py"), Some(90)));
    assert!(!e.starved());
}

#[test]
fn a_real_block_beside_a_collection_is_still_blamed_and_says_how_long_collections_took() {
    let mut s = Sim::new();
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .call(A, Tag::PLAIN)
        .collect_garbage(1, 30)
        .ret(A)
        .c_call(SLEEP, Tag::PLAIN)
        .advance(25)
        .c_ret(SLEEP)
        .ret(MAIN)
        .leave_dispatch();
    let e = &s.episodes[0];
    assert_eq!(e.kind, EpisodeKind::Call);
    assert_eq!(e.culprit_frame().name, "time.sleep");
    assert_eq!((e.duration_ns, e.gc_ns, e.gc_generation), (55, 30, Some(1)));
}

#[test]
fn a_call_that_a_collection_interrupted_is_not_the_culprit_its_caller_is() {
    let mut s = Sim::new();
    // A runs 25 ticks of its own, then B inside it runs 2 and is interrupted by a 30-tick
    // collection: B is over the threshold by wall time only.
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .call(A, Tag::PLAIN)
        .advance(25)
        .call(B, Tag::PLAIN)
        .advance(2)
        .collect_garbage(0, 30)
        .ret(B)
        .ret(A)
        .ret(MAIN)
        .leave_dispatch();
    let e = &s.episodes[0];
    assert_eq!(e.kind, EpisodeKind::Call);
    assert_eq!(e.culprit_frame().name, "app.a");
    assert_eq!(e.gc_ns, 30);
}

#[test]
fn a_collection_before_the_step_is_not_counted_in_it() {
    let mut s = Sim::new();
    s.collect_garbage(2, 100)
        .enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .call(A, Tag::PLAIN)
        .advance(30)
        .ret(A)
        .ret(MAIN)
        .leave_dispatch();
    let e = &s.episodes[0];
    assert_eq!(e.culprit_frame().name, "app.a");
    assert_eq!((e.gc_ns, e.gc_generation), (0, None));
}

#[test]
fn a_step_the_machine_starved_stays_starved_with_a_collection_in_it() {
    let mut s = sim_with_cpu_wait();
    s.enter_dispatch()
        .call(MAIN, Tag::COROUTINE)
        .call(A, Tag::PLAIN)
        .collect_garbage(0, 5)
        .wait_for_cpu(25)
        .ret(A)
        .ret(MAIN)
        .leave_dispatch();
    let e = &s.episodes[0];
    assert!(e.starved());
    assert_ne!(e.kind, EpisodeKind::Gc);
}
