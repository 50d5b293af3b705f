//! The always-on mode's units on a loop implemented in C (uvloop), from 3.14, as `c_loops` tells
//! them: each is timed from its first switch to its last, its stack read from the frame the loop
//! was called from, and blamed like a unit of asyncio's own loops. asyncio's own loops keep
//! `Handle._run`'s events: a switch inside a unit they started is theirs.

use loopwatch_core::Ticks;
use pyo3::ffi;
use pyo3::prelude::*;

use super::{attached, sampling, unit_over_threshold, State, ThreadSampler};
use crate::c_loops::{entered_from, watches_c_loops, ContextUnit, Switch};

/// A switch of the calling thread's context (`c_loops`' watcher).
///
/// # Safety
/// GIL held; `context` is the object the watcher was called with.
pub unsafe fn on_context_switch(context: *mut ffi::PyObject) {
    let Some(obj) = sampling() else {
        return;
    };
    let state = &mut *ThreadSampler::state_of(obj);
    if !state.installed || (state.contexts.unit.is_none() && state.unit.is_some()) {
        return; // not watching, or inside a unit of asyncio's own loop: its callback's switches
    }
    let py = Python::assume_attached();
    match state.contexts.switched(py, context) {
        Switch::Nothing => {}
        Switch::Start(starting) => start(state, starting.at(state.clock.now(), 0)),
        Switch::End => end(obj, state, state.clock.now(), true),
        Switch::Restart(starting) => {
            // The next unit starts as this one ends: one clock read, and the watchdog told once
            // unless this one is reported.
            let now = state.clock.now();
            end(obj, state, now, false);
            if state.installed && state.unit.is_none() {
                start(state, starting.at(now, 0));
            }
        }
    }
}

/// The running unit ends at `now`; reported if it ran past the threshold. Its context is alive:
/// the loop holds it until its call that switched away returns. `idle`: no unit follows (the
/// watchdog is told; else the next unit's start tells it).
unsafe fn end(obj: *mut ffi::PyObject, state: &mut State, now: Ticks, idle: bool) {
    let Some(started) = state.unit else {
        state.contexts.unit = None;
        return;
    };
    state.unit = None;
    if now.saturating_sub(started) < state.threshold {
        if let (true, Some(watch)) = (idle, state.watch.as_mut()) {
            watch.publish(None);
        }
    } else {
        let handle = context_of(state);
        attached(|| unit_over_threshold(obj, state, (started, now), handle));
    }
    state.contexts.unit = None;
}

/// A unit starts (at `unit.started`).
fn start(state: &mut State, unit: ContextUnit) {
    state.unit = Some(unit.started);
    if let Some(watch) = state.watch.as_mut() {
        watch.set_boundary(unit.boundary);
        watch.publish(Some(unit.started));
    }
    state.contexts.unit = Some(unit);
}

/// The running unit's context (borrowed), for its report; null if none runs.
fn context_of(state: &State) -> *mut ffi::PyObject {
    state
        .contexts
        .unit
        .as_ref()
        .map_or(std::ptr::null_mut(), |unit| {
            unit.context as *mut ffi::PyObject
        })
}

/// The watch starts inside a task step of a C loop: times it from now, as `install` does a
/// unit of asyncio's. Its context and boundary come from the task (`_sampling.running_unit`).
pub(super) fn adopt_running_unit(py: Python<'_>, state: &mut State) -> PyResult<()> {
    if !watches_c_loops() {
        return Ok(());
    }
    let found = py
        .import("loopwatch._sampling")?
        .call_method0("running_unit")?;
    if found.is_none() {
        return Ok(());
    }
    let (context, frame): (Bound<'_, PyAny>, Bound<'_, PyAny>) = found.extract()?;
    let (entered, base) = unsafe { entered_from(context.as_ptr() as usize) };
    let boundary = unsafe { crate::codes::interpreter_frame_of(frame.as_ptr().cast()) };
    if let (true, Some(boundary)) = (entered, boundary) {
        // The task holds its context for as long as the step runs.
        let now = state.clock.now();
        let unit = ContextUnit::adopted(context.as_ptr() as usize, base, boundary, now);
        start(state, unit);
    }
    Ok(())
}
