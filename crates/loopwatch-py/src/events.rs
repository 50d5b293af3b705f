//! What both ways of seeing (the legacy profile hook, `sys.monitoring`) hand the tracker: one
//! event, taken on the hot path when nothing is to be decided, else on the general path.

use std::panic::{catch_unwind, AssertUnwindSafe};

use loopwatch_core::{Episode, Tag, Ticks};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::codes::{code_tag, frame_tag};
use crate::errors::{attached, SavedError};
use crate::monitor::{State, ThreadMonitor};
use crate::report::episode_to_python;
use crate::resolve::{FrameKeys, PyResolver};

/// One event of the thread being watched, keyed as the tracker keys it: a Python frame by its
/// address (a frame object, or an interpreter frame under `sys.monitoring`), a C function by its
/// `PyMethodDef`.
#[derive(Clone, Copy)]
#[repr(C)]
pub enum Event {
    Call(u64),
    Return(u64),
    CCall(usize),
    CReturn(usize),
}

/// Where a Python call event came from, for what the hot path does not read: the tag of code
/// the fast reads could not place, and the position a coroutine resumes at.
#[derive(Clone, Copy)]
#[repr(C)]
pub enum Origin {
    /// The legacy hook's frame object.
    Frame(*mut ffi::PyFrameObject),
    /// `sys.monitoring`'s code object and instruction offset (bytes).
    #[cfg_attr(not(Py_3_12), allow(dead_code))]
    Code {
        code: *mut ffi::PyObject,
        offset: i32,
    },
    /// No Python call (returns and C events).
    None,
}

impl Origin {
    unsafe fn tag(self, state: &State) -> Tag {
        match self {
            Origin::Frame(frame) => frame_tag(state.known, frame),
            Origin::Code { code, .. } => code_tag(state.known, code),
            Origin::None => Tag::PLAIN,
        }
    }

    /// Where a coroutine step resumes: the byte offset of the current instruction, plus one so
    /// that zero means unknown. Turned into a line only if the step turns out to block.
    unsafe fn resume(self) -> i32 {
        match self {
            Origin::Frame(frame) => resume_position(frame),
            Origin::Code { offset, .. } => offset.max(-1) + 1,
            Origin::None => 0,
        }
    }
}

/// The C function of a C event and the object it was called on (for a method descriptor, which
/// is named as the bound method it stands for), borrowed; null where there is none.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Callee {
    pub callable: *mut ffi::PyObject,
    pub self_arg: *mut ffi::PyObject,
}

impl Callee {
    pub const NONE: Callee = Callee {
        callable: std::ptr::null_mut(),
        self_arg: std::ptr::null_mut(),
    };
}

/// Handles the events that make up nearly all of a program's run (a short call inside a task
/// step or callback) with no function call and nothing that can fail. `tag` is the call's tag
/// where the fast reads found it. Returns false when the general path must decide.
#[inline(always)]
pub fn hot_event(state: &mut State, event: Event, tag: Option<Tag>, now: Ticks) -> bool {
    let known = state.known;
    let Some(tracker) = state.tracker.as_mut().filter(|_| !state.paused) else {
        // Not tracking, or loopwatch's own code is running: nothing to do.
        return true;
    };
    match event {
        Event::Call(key) => match tag {
            Some(tag) => tracker.try_push_plain(key, tag, false, now),
            None => false,
        },
        Event::Return(key) => tracker.try_pop_plain(key, false, now),
        Event::CCall(def) if def != known.context_run_def => {
            tracker.try_push_plain(def as u64, Tag::PLAIN, true, now)
        }
        Event::CCall(_) => false,
        Event::CReturn(def) => tracker.try_pop_plain(def as u64, true, now),
    }
}

/// Everything the hot path leaves: loop structure, coroutine steps, calls over the threshold.
/// Returns the hook's result, always 0: non-zero would raise into the user's code. `extern "C"`
/// because it never unwinds, which lets the hot path jump to it instead of calling it.
///
/// # Safety
/// GIL held; `obj` is the live `ThreadMonitor` of this thread; the pointers in `origin` and
/// `callee` are valid for the event.
#[inline(never)]
pub unsafe extern "C" fn general_event(
    obj: *mut ffi::PyObject,
    event: Event,
    origin: Origin,
    callee: Callee,
    frames: FrameKeys,
    now: Ticks,
) -> i32 {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let state = ThreadMonitor::state_of(obj);
        if let Some(delivery) = handle_event(&mut *state, event, origin, callee, frames, now) {
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
    state: &mut State,
    event: Event,
    origin: Origin,
    callee: Callee,
    frames: FrameKeys,
    now: Ticks,
) -> Option<Delivery> {
    let tag = match event {
        Event::Call(_) => origin.tag(state),
        _ => Tag::PLAIN,
    };
    let known = state.known;
    let tracker = state.tracker.as_mut()?;
    let py = Python::assume_attached();
    let mut resolver = PyResolver::new(py, callee, frames);
    match event {
        Event::Call(key) => {
            let resume = if tag.contains(Tag::COROUTINE) {
                origin.resume()
            } else {
                0
            };
            tracker.on_call(key, tag, resume, now, &mut resolver);
        }
        Event::Return(key) => tracker.on_return(key, now, &mut resolver),
        Event::CCall(def) => {
            let tag = if def == known.context_run_def {
                Tag::DISPATCH
            } else {
                Tag::PLAIN
            };
            tracker.on_c_call(def as u64, tag, now, &mut resolver);
        }
        Event::CReturn(def) => tracker.on_c_return(def as u64, now, &mut resolver),
    }
    if let Some(watch) = state.watch.as_mut() {
        let reported = watch.publish(tracker.unit_started_at());
        if reported > 0 {
            tracker.note_reports_while_running(reported);
        }
    }
    if tracker.has_episodes() {
        return state.take_delivery();
    }
    None
}

/// Where a frame object's coroutine step resumes (see `Origin::resume`).
///
/// # Safety
/// `frame` is a live frame object; GIL held.
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
///
/// # Safety
/// GIL held; `obj` is a live `ThreadMonitor`.
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
