//! The C profile hook: translates CPython's events into tracker calls. The hot path reads the
//! clock and the code's tag and pushes or pops one entry; everything else is the general path.

use std::ffi::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};

use loopwatch_core::{Episode, Tag, Ticks};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::codes::{exact_method_def, fast_frame_tag, frame_tag, method_def};
use crate::errors::{attached, SavedError};
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
    match (*ThreadMonitor::state_of(obj)).clock.counter_now() {
        Some(now) => event_at(obj, frame, what, arg, now),
        None => event_on_portable_clock(obj, frame, what, arg),
    }
}

/// `profile_hook` on a thread that had a C profile function before us (a `sys.setprofile`
/// function's trampoline, cProfile before 3.12, another tool): that function gets every event
/// after us, as if loopwatch were not there, and has its say: its non-zero result (its own
/// exception) is what it would have raised without loopwatch. A hook of its own, so that the
/// usual case pays nothing for it.
///
/// # Safety
/// As `profile_hook`.
pub unsafe extern "C" fn chaining_profile_hook(
    obj: *mut ffi::PyObject,
    frame: *mut ffi::PyFrameObject,
    what: c_int,
    arg: *mut ffi::PyObject,
) -> c_int {
    profile_hook(obj, frame, what, arg);
    match (*ThreadMonitor::state_of(obj)).chained {
        Some(previous) => match previous.func {
            Some(func) => func(previous.obj, frame, what, arg),
            None => 0,
        },
        None => 0,
    }
}

/// `profile_hook` where the clock is not a plain counter read (no invariant TSC): kept out of
/// line so that the clock call costs the usual case nothing.
#[inline(never)]
unsafe extern "C" fn event_on_portable_clock(
    obj: *mut ffi::PyObject,
    frame: *mut ffi::PyFrameObject,
    what: c_int,
    arg: *mut ffi::PyObject,
) -> c_int {
    let now = (*ThreadMonitor::state_of(obj)).clock.now();
    event_at(obj, frame, what, arg, now)
}

/// One event read at `now`: the hot path, else the general path. `general_event` cannot unwind
/// (it is `extern "C"`), so the hot path needs no landing pad and saves few registers.
#[inline(always)]
unsafe fn event_at(
    obj: *mut ffi::PyObject,
    frame: *mut ffi::PyFrameObject,
    what: c_int,
    arg: *mut ffi::PyObject,
    now: Ticks,
) -> c_int {
    if hot_event(&mut *ThreadMonitor::state_of(obj), frame, what, arg, now) {
        return 0;
    }
    general_event(obj, frame, what, arg, now)
}

/// Handles the events that make up nearly all of a program's run (a short call inside a task
/// step or callback) with no function call and nothing that can fail. Returns false when the
/// general path must decide.
#[inline(always)]
unsafe fn hot_event(
    state: &mut State,
    frame: *mut ffi::PyFrameObject,
    what: c_int,
    arg: *mut ffi::PyObject,
    now: Ticks,
) -> bool {
    let known = state.known;
    let Some(tracker) = state.tracker.as_mut().filter(|_| !state.paused) else {
        // Not tracking, or loopwatch's own code is running: nothing to do.
        return true;
    };
    match what {
        ffi::PyTrace_CALL => match fast_frame_tag(known, frame) {
            Some(tag) => tracker.try_push_plain(frame as u64, tag, false, now),
            None => false,
        },
        ffi::PyTrace_RETURN => tracker.try_pop_plain(frame as u64, false, now),
        ffi::PyTrace_C_CALL => match exact_method_def(arg) {
            Some(def) if def != known.context_run_def => {
                tracker.try_push_plain(def as u64, Tag::PLAIN, true, now)
            }
            _ => false,
        },
        ffi::PyTrace_C_RETURN | ffi::PyTrace_C_EXCEPTION => match exact_method_def(arg) {
            Some(def) => tracker.try_pop_plain(def as u64, true, now),
            None => false,
        },
        _ => true,
    }
}

/// Everything the hot path leaves: loop structure, coroutine steps, calls over the threshold.
/// Returns the hook's result, always 0: non-zero would raise into the user's code. `extern "C"`
/// because it never unwinds, which lets the hook jump to it instead of calling it.
#[inline(never)]
unsafe extern "C" fn general_event(
    obj: *mut ffi::PyObject,
    frame: *mut ffi::PyFrameObject,
    what: c_int,
    arg: *mut ffi::PyObject,
    now: Ticks,
) -> c_int {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let state = ThreadMonitor::state_of(obj);
        if let Some(delivery) = handle_event(state, frame, what, arg, now) {
            deliver(obj, delivery);
        }
    }));
    if outcome.is_err() {
        // A bug in loopwatch must not take the program down: stop tracking on this thread.
        (*ThreadMonitor::state_of(obj)).tracker = None;
    }
    0
}

/// Episodes to hand to Python, taken out of the state so that no borrow is held meanwhile.
pub struct Delivery {
    pub episodes: Vec<Episode>,
    pub sink: Py<PyAny>,
}

unsafe fn handle_event(
    state: *mut State,
    frame: *mut ffi::PyFrameObject,
    what: c_int,
    arg: *mut ffi::PyObject,
    now: Ticks,
) -> Option<Delivery> {
    let state = &mut *state;
    let known = state.known;
    let tracker = state.tracker.as_mut()?;
    let py = Python::assume_attached();
    let mut resolver = PyResolver::new(py, arg);
    match what {
        ffi::PyTrace_CALL => {
            let tag = frame_tag(known, frame);
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
/// thread's reference to it), so the monitor is kept alive until delivery is over. The delivery
/// (with its reference to the sink) is dropped while attached, so it is released at once.
#[cold]
pub unsafe fn deliver(obj: *mut ffi::PyObject, delivery: Delivery) {
    attached(|| {
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
        drop(delivery);
        ffi::Py_DECREF(obj);
    });
}
