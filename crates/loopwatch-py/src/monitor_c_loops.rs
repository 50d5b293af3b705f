//! The exact mode on a loop implemented in C (uvloop), from 3.14: a callback that is a C function
//! makes no profile or `sys.monitoring` event, so the tracker alone never sees it. `c_loops`
//! tells each callback's start and end from the contexts the loop runs it in; one in which the
//! tracker started no unit (no Python frame ran) and that ran past the threshold is reported as
//! C code the loop called. The loop entering a context also tells the tracker where the loop
//! runs callbacks from, so a Python callback is a unit from the first, task step or not. The
//! watchdog times such a callback too, and reads only what runs above the loop's frame.

use loopwatch_core::{FrameInfo, Ticks};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::c_loops::{Starting, Switch};
use crate::events::{deliver, Callee};
use crate::monitor::{State, ThreadMonitor};
use crate::resolve::PyResolver;

/// A switch of the calling thread's context, for its exact monitor `obj` (`c_loops`' watcher).
///
/// # Safety
/// GIL held; `obj` is the thread's live `ThreadMonitor`; `context` is the object the watcher was
/// called with.
pub unsafe fn on_context_switch(obj: *mut ffi::PyObject, context: *mut ffi::PyObject) {
    let state = &mut *ThreadMonitor::state_of(obj);
    let Some(tracker) = state.tracker.as_ref() else {
        return;
    };
    if state.paused
        || (state.c_loops.unit.is_none() && (tracker.in_unit() || tracker.dispatching()))
    {
        // loopwatch's own code, or a callback the tracker sees whole (asyncio's own loop).
        return;
    }
    let py = Python::assume_attached();
    match state.c_loops.switched(py, context) {
        Switch::Nothing => {}
        Switch::Start(starting) => start(state, starting, state.clock.now()),
        Switch::End => end(obj, state, state.clock.now()),
        Switch::Restart(starting) => {
            let now = state.clock.now();
            end(obj, state, now);
            if state.tracker.is_some() {
                start(state, starting, now);
            }
        }
    }
}

fn start(state: &mut State, starting: Starting, now: Ticks) {
    let Some(tracker) = state.tracker.as_mut() else {
        return;
    };
    tracker.hosts_a_c_loop();
    if let Some(watch) = state.watch.as_mut() {
        watch.set_boundary(starting.boundary);
        if !tracker.in_unit() {
            watch.publish(Some(now));
        }
    }
    state.c_loops.unit = Some(starting.at(now, tracker.units_started()));
}

/// The running callback ends at `now`: reported if it ran no Python frame and past the threshold.
unsafe fn end(obj: *mut ffi::PyObject, state: &mut State, now: Ticks) {
    let Some(unit) = state.c_loops.unit.take() else {
        return;
    };
    // No Python frame ran as a callback in it (the tracker started no unit), and it ran long.
    let c_code_over = state.tracker.as_ref().is_some_and(|tracker| {
        tracker.units_started() == unit.mark
            && !tracker.in_unit()
            && now.saturating_sub(unit.started) >= tracker.threshold()
    });
    if c_code_over {
        let py = Python::assume_attached();
        let _saved = crate::errors::SavedError::take();
        let info = FrameInfo {
            name: state.c_loops.c_callback_name(),
            ..FrameInfo::default()
        };
        let keys = state.frame_keys();
        if let Some(tracker) = state.tracker.as_mut() {
            tracker.c_loop_callback_ran(
                info,
                unit.started,
                now,
                &mut PyResolver::new(py, Callee::NONE, keys),
            );
        }
    }
    let Some(tracker) = state.tracker.as_mut() else {
        return;
    };
    if let Some(watch) = state.watch.as_mut() {
        let reported = watch.publish(tracker.unit_started_at());
        if reported > 0 {
            tracker.note_reports_while_running(reported);
        }
        watch.set_boundary(0);
    }
    if let Some(delivery) = state.take_delivery() {
        // The sink is loopwatch's own code: no switch it makes is the program's. It may stop
        // the monitor: kept alive until its state is put back.
        let was_paused = std::mem::replace(&mut state.paused, true);
        ffi::Py_INCREF(obj);
        deliver(obj, delivery);
        (*ThreadMonitor::state_of(obj)).paused = was_paused;
        ffi::Py_DECREF(obj);
    }
}
