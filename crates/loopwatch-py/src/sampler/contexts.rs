//! The always-on mode's units on a loop implemented in C (uvloop), from 3.14: such a loop calls
//! no Python code of its own between callbacks, so no `sys.monitoring` event marks a unit, but it
//! runs each callback (a task step is one) inside the `contextvars.Context` it was scheduled in.
//! A context watcher (`PyContext_AddWatcher`, 3.14+) sees every switch of a thread's context; those
//! the loop makes, with no Python frame above the one it was called from, part its units
//! (`loopwatch_core::sampled::context_switch`). Two calls of a C function per callback, four
//! when uvloop runs it from its own handler; nothing else in the program is watched. asyncio's
//! own loops keep `Handle._run`'s events: a switch inside a unit they started is theirs.

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use loopwatch_core::sampled::{context_switch, ContextSwitch};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use super::{attached, sampling, unit_over_threshold, State, ThreadSampler};
use crate::threadstate::{confirm_current_frame, current_interpreter_frame};

/// `PyContext.ctx_prev` and `ctx_entered` (`Include/internal/pycore_context.h`, the same from 3.7
/// to 3.15): confirmed at registration by entering two contexts (see `layout_checks_out`).
const CTX_PREV: usize = 16;
const CTX_ENTERED: usize = 40;

/// The watcher's id while registered, else -1.
static WATCHER: AtomicI32 = AtomicI32::new(-1);
/// Whether the context layout and the current-frame read were confirmed (decided once).
static TRUSTED: AtomicBool = AtomicBool::new(false);
static CHECKED: AtomicBool = AtomicBool::new(false);

/// The running unit of a C loop: the context it runs in (borrowed: the loop holds it until the
/// unit ends), the loop's own level (see `ContextSwitch::Start`), and the interpreter frame the
/// loop was called from (the unit's frames are those above it).
pub(super) struct ContextUnit {
    pub(super) context: usize,
    base: usize,
    boundary: usize,
}

/// What the watcher keeps per thread: the unit running, and whether the last loop type seen runs
/// its units this way (any loop that is not asyncio's own).
#[derive(Default)]
pub(super) struct Contexts {
    pub(super) unit: Option<ContextUnit>,
    loop_type: Option<(Py<PyAny>, bool)>,
}

#[allow(clippy::cast_ptr_alignment)] // aligned fields of the C struct
unsafe fn entered_from(context: usize) -> (bool, usize) {
    if context == 0 {
        return (false, 0);
    }
    let base = context as *const u8;
    let entered = base.add(CTX_ENTERED).cast::<c_int>().read() != 0;
    (entered, base.add(CTX_PREV).cast::<usize>().read())
}

/// Enters two fresh contexts and checks the fields read are what they must be.
unsafe fn layout_checks_out() -> bool {
    if cfg!(Py_GIL_DISABLED) || cfg!(Py_3_16) || !confirm_current_frame() {
        return false;
    }
    let outer = ffi::PyContext_New();
    let inner = ffi::PyContext_New();
    let mut ok = false;
    if !outer.is_null() && !inner.is_null() && ffi::PyContext_Enter(outer) == 0 {
        if ffi::PyContext_Enter(inner) == 0 {
            ok = entered_from(inner as usize) == (true, outer as usize);
            ok &= ffi::PyContext_Exit(inner) == 0 && !entered_from(inner as usize).0;
        }
        ok &= ffi::PyContext_Exit(outer) == 0;
    }
    ffi::Py_XDECREF(inner);
    ffi::Py_XDECREF(outer);
    if ffi::PyErr_Occurred().is_null() {
        ok
    } else {
        ffi::PyErr_Clear();
        false
    }
}

/// Whether units of C loops can be told here: the fields read check out (decided once, with the
/// GIL, called from Python code).
pub fn trusted(_py: Python<'_>) -> bool {
    if !CHECKED.swap(true, Ordering::Relaxed) {
        TRUSTED.store(unsafe { layout_checks_out() }, Ordering::Relaxed);
    }
    TRUSTED.load(Ordering::Relaxed)
}

/// Adds the watcher (the first thread registering). Where the layout cannot be trusted, it is not
/// added: C loops are then not watched (`ThreadSampler.sees_c_loops` says so beforehand).
pub(super) fn register(py: Python<'_>) {
    if trusted(py) && WATCHER.load(Ordering::Relaxed) < 0 {
        let id = unsafe { ffi::PyContext_AddWatcher(on_switch) };
        if id < 0 {
            unsafe { ffi::PyErr_Clear() }; // every watcher slot taken: C loops go unwatched
        }
        WATCHER.store(id, Ordering::Relaxed);
    }
}

/// Clears the watcher (the last thread leaving).
pub(super) fn unregister() {
    let id = WATCHER.swap(-1, Ordering::Relaxed);
    if id >= 0 && unsafe { ffi::PyContext_ClearWatcher(id) } < 0 {
        unsafe { ffi::PyErr_Clear() };
    }
}

/// Whether units of C-implemented loops are seen now.
pub fn watches_c_loops() -> bool {
    WATCHER.load(Ordering::Relaxed) >= 0
}

static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static BASE_EVENT_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Whether the calling thread runs a loop that is not asyncio's own: asked at a unit's start
/// only, with the answer kept per loop type.
fn runs_a_c_loop(py: Python<'_>, contexts: &mut Contexts) -> bool {
    let Ok(running) = GET_RUNNING_LOOP
        .import(py, "asyncio.events", "_get_running_loop")
        .and_then(PyAnyMethods::call0)
    else {
        return false;
    };
    if running.is_none() {
        return false;
    }
    let kind = running.get_type();
    if let Some((known, answer)) = contexts.loop_type.as_ref() {
        if known.as_ptr() == kind.as_ptr() {
            return *answer;
        }
    }
    let answer = BASE_EVENT_LOOP
        .import(py, "asyncio.base_events", "BaseEventLoop")
        .and_then(|base| kind.is_subclass(base))
        .is_ok_and(|asyncio_own| !asyncio_own);
    contexts.loop_type = Some((kind.into_any().unbind(), answer));
    answer
}

/// `Py_CONTEXT_SWITCHED` on any thread: the thread's context is now `context` (None for none).
unsafe extern "C" fn on_switch(_event: ffi::PyContextEvent, context: *mut ffi::PyObject) -> c_int {
    let Some(obj) = sampling() else {
        return 0;
    };
    let state = &mut *ThreadSampler::state_of(obj);
    if !state.installed {
        return 0;
    }
    let new = if context == ffi::Py_None() {
        0
    } else {
        context as usize
    };
    let running = state
        .contexts
        .unit
        .as_ref()
        .map(|unit| (unit.base, unit.boundary));
    if running.is_none() && state.unit.is_some() {
        return 0; // inside a unit of asyncio's own loop: its switches are its callback's
    }
    let frame = current_interpreter_frame();
    let at_loop_level = running.is_some_and(|(_, boundary)| boundary == frame);
    let (entered, prev) = entered_from(new);
    match context_switch(
        running.map(|(base, _)| base),
        at_loop_level,
        new,
        entered,
        prev,
    ) {
        ContextSwitch::Neither => {}
        ContextSwitch::Start { base } => {
            let py = Python::assume_attached();
            let _saved = crate::errors::SavedError::take();
            if runs_a_c_loop(py, &mut state.contexts) {
                start(
                    state,
                    ContextUnit {
                        context: new,
                        base,
                        boundary: frame,
                    },
                );
            }
        }
        ContextSwitch::End => end(obj, state),
        ContextSwitch::Restart => {
            if let Some((base, boundary)) = running {
                end(obj, state);
                if state.installed && state.unit.is_none() {
                    start(
                        state,
                        ContextUnit {
                            context: new,
                            base,
                            boundary,
                        },
                    );
                }
            }
        }
    }
    0
}

/// The running unit ends now; reported if it ran past the threshold. Its context is alive: the
/// loop holds it until its call that switched away returns.
unsafe fn end(obj: *mut ffi::PyObject, state: &mut State) {
    let Some(started) = state.unit else {
        state.contexts.unit = None;
        return;
    };
    let now = state.clock.now();
    if now.saturating_sub(started) < state.threshold {
        state.unit = None;
        if let Some(watch) = state.watch.as_mut() {
            watch.publish(None);
        }
    } else {
        state.unit = None;
        let handle = context_of(state);
        attached(|| unit_over_threshold(obj, state, (started, now), handle));
    }
    state.contexts.unit = None;
}

/// A unit starts.
fn start(state: &mut State, unit: ContextUnit) {
    let now = state.clock.now();
    state.unit = Some(now);
    if let Some(watch) = state.watch.as_mut() {
        watch.set_boundary(unit.boundary);
        watch.publish(Some(now));
    }
    state.contexts.unit = Some(unit);
}

/// The running unit's context (borrowed), for its report; null if none runs.
pub(super) fn context_of(state: &State) -> *mut ffi::PyObject {
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
        start(
            state,
            ContextUnit {
                context: context.as_ptr() as usize,
                base,
                boundary,
            },
        );
    }
    Ok(())
}
