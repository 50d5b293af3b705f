//! The legacy C profile hook (`PyEval_SetProfile`): translates CPython's events into tracker
//! events. The hot path reads the clock and the code's tag and pushes or pops one entry;
//! everything else is the general path (`events`).

use std::ffi::c_int;

use loopwatch_core::Ticks;
use pyo3::ffi;

use crate::codes::{exact_method_def, fast_frame_tag, method_def};
use crate::events::{general_event, hot_event, Callee, Event, Origin};
use crate::monitor::ThreadMonitor;
use crate::resolve::FrameKeys;

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

/// One event read at `now`: the hot path, else the general path. Each arm hands `hot_event` an
/// event of a kind known here, so that its own dispatch on the kind folds away.
#[inline(always)]
unsafe fn event_at(
    obj: *mut ffi::PyObject,
    frame: *mut ffi::PyFrameObject,
    what: c_int,
    arg: *mut ffi::PyObject,
    now: Ticks,
) -> c_int {
    let state = &mut *ThreadMonitor::state_of(obj);
    let key = frame as u64;
    // The hot path takes C functions of the two exact builtin types (nearly every C event),
    // without the subtype check's call into the interpreter.
    let (event, origin) = match what {
        ffi::PyTrace_CALL => {
            let event = Event::Call(key);
            if hot_event(state, event, fast_frame_tag(state.known, frame), now) {
                return 0;
            }
            (event, Origin::Frame(frame))
        }
        ffi::PyTrace_RETURN => {
            let event = Event::Return(key);
            if hot_event(state, event, None, now) {
                return 0;
            }
            (event, Origin::None)
        }
        ffi::PyTrace_C_CALL => match exact_method_def(arg) {
            Some(def) if hot_event(state, Event::CCall(def), None, now) => return 0,
            Some(def) => (Event::CCall(def), Origin::None),
            None => return c_event_on_subtype(obj, what, arg, now),
        },
        ffi::PyTrace_C_RETURN | ffi::PyTrace_C_EXCEPTION => match exact_method_def(arg) {
            Some(def) if hot_event(state, Event::CReturn(def), None, now) => return 0,
            Some(def) => (Event::CReturn(def), Origin::None),
            None => return c_event_on_subtype(obj, what, arg, now),
        },
        _ => return 0,
    };
    let callee = Callee {
        callable: arg,
        self_arg: std::ptr::null_mut(),
    };
    general_event(obj, event, origin, callee, FrameKeys::Objects, now)
}

/// A C event whose callable is not of an exact builtin type: a subclass of one (its
/// `PyMethodDef` found through the C API), or not a C function at all (nothing to do).
#[cold]
unsafe fn c_event_on_subtype(
    obj: *mut ffi::PyObject,
    what: c_int,
    arg: *mut ffi::PyObject,
    now: Ticks,
) -> c_int {
    let state = &mut *ThreadMonitor::state_of(obj);
    if state.tracker.is_none() || state.paused {
        return 0;
    }
    let Some(def) = method_def(arg) else {
        return 0;
    };
    let event = if what == ffi::PyTrace_C_CALL {
        Event::CCall(def)
    } else {
        Event::CReturn(def)
    };
    let callee = Callee {
        callable: arg,
        self_arg: std::ptr::null_mut(),
    };
    general_event(obj, event, Origin::None, callee, FrameKeys::Objects, now)
}
