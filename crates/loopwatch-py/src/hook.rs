//! The C profile hook: translates CPython's events into tracker calls. The fast path reads the
//! clock, the code tag and pushes or pops one entry; everything else happens on the cold path.

use std::ffi::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};

use loopwatch_core::{Episode, Tag};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::codes::{method_def, tag_of};
use crate::errors::SavedError;
use crate::monitor::{State, ThreadMonitor};
use crate::report::episode_to_python;
use crate::resolve::PyResolver;

/// The profile function installed by `ThreadMonitor.install`; `obj` is that monitor.
///
/// # Safety
/// Called by CPython with the GIL held and `obj` the `ThreadMonitor` it was installed with.
pub unsafe extern "C" fn profile_hook(
    obj: *mut ffi::PyObject,
    frame: *mut ffi::PyFrameObject,
    what: c_int,
    arg: *mut ffi::PyObject,
) -> c_int {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let state = ThreadMonitor::state_of(obj);
        if let Some(delivery) = handle_event(state, frame, what, arg) {
            deliver(obj, &delivery);
        }
    }));
    if outcome.is_err() {
        // A bug in loopwatch must not take the program down: stop tracking on this thread.
        (*ThreadMonitor::state_of(obj)).tracker = None;
    }
    // Never non-zero: that would raise into the user's code.
    0
}

/// Episodes to hand to Python, taken out of the state so that no borrow is held meanwhile.
pub struct Delivery {
    pub episodes: Vec<Episode>,
    pub sink: Py<PyAny>,
}

#[inline]
unsafe fn handle_event(
    state: *mut State,
    frame: *mut ffi::PyFrameObject,
    what: c_int,
    arg: *mut ffi::PyObject,
) -> Option<Delivery> {
    let state = &mut *state;
    if state.paused {
        return None;
    }
    let known = state.known;
    let tracker = state.tracker.as_mut()?;
    let now = state.clock.now();
    let py = Python::assume_attached();
    let mut resolver = PyResolver::new(py, arg);
    match what {
        ffi::PyTrace_CALL => {
            let code = ffi::PyFrame_GetCode(frame);
            let tag = tag_of(known, code);
            ffi::Py_DECREF(code.cast());
            let resume = if tag.contains(Tag::COROUTINE) {
                resume_position(frame)
            } else {
                0
            };
            tracker.on_call(frame as u64, tag, resume, now, &mut resolver);
        }
        ffi::PyTrace_RETURN => tracker.on_return(frame as u64, now, &mut resolver),
        ffi::PyTrace_C_CALL => {
            if let Some(def) = method_def(arg) {
                let tag = if def == known.context_run_def {
                    Tag::DISPATCH
                } else {
                    Tag::PLAIN
                };
                tracker.on_c_call(def as u64, tag, now, &mut resolver);
            }
        }
        ffi::PyTrace_C_RETURN | ffi::PyTrace_C_EXCEPTION => {
            if let Some(def) = method_def(arg) {
                tracker.on_c_return(def as u64, now, &mut resolver);
            }
        }
        _ => {}
    }
    if tracker.has_episodes() {
        return state.take_delivery();
    }
    None
}

/// Where a coroutine step resumes: the byte offset of the current instruction, plus one so that
/// zero means unknown. Turned into a line only if the step turns out to block.
#[inline]
pub unsafe fn resume_position(frame: *mut ffi::PyFrameObject) -> i32 {
    #[cfg(Py_3_11)]
    {
        ffi::PyFrame_GetLasti(frame).max(-1) + 1
    }
    #[cfg(not(Py_3_11))]
    {
        crate::codes::legacy_lasti_bytes(frame).map_or(0, |lasti| lasti.max(-1) + 1)
    }
}

/// Calls the sink with each episode. The sink may deactivate the monitor (and so drop the
/// thread's reference to it), so the monitor is kept alive until delivery is over.
#[cold]
pub unsafe fn deliver(obj: *mut ffi::PyObject, delivery: &Delivery) {
    let py = Python::assume_attached();
    let _saved = SavedError::take();
    ffi::Py_INCREF(obj);
    let sink = delivery.sink.bind(py);
    for episode in &delivery.episodes {
        let outcome = episode_to_python(py, episode).and_then(|report| sink.call1((report,)));
        if let Err(error) = outcome {
            // The sink is loopwatch's own dispatcher; should it fail, say so and carry on.
            error.write_unraisable(py, Some(sink));
        }
    }
    ffi::Py_DECREF(obj);
}
