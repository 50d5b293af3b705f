//! The exact mode seen through `sys.monitoring` (3.12+): callbacks written in Rust, called by
//! CPython with the code object and offset (no frame object made), feed the same tracker events
//! as the legacy hook. Monitoring is per interpreter: one tool id serves every watched thread,
//! and a thread that is not watched pays one thread-local read per event.

use std::cell::Cell;
use std::sync::OnceLock;

use loopwatch_core::Tag;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::codes::{c_function_def, fast_code_tag};
use crate::events::{general_event, hot_event, Callee, Event, Origin};
use crate::monitor::{State, ThreadMonitor};
use crate::resolve::FrameKeys;
use crate::threadend::{guard_thread_end, unguard_thread_end};
pub use crate::threadend::{none, UnderTheGil};
use crate::threadend::{rust_callable, rust_callable_type};
use crate::threadstate::current_interpreter_frame;

/// The tool ids loopwatch asks for, in order: 3 and 4 have no role in PEP 669; 5 (the
/// optimizer's) is taken last.
const TOOL_IDS: [u8; 3] = [4, 3, 5];
const TOOL_NAME: &str = "loopwatch";
/// Why the legacy hook watches where `sys.monitoring` would have.
pub const NO_FREE_TOOL_ID: &str = "every sys.monitoring tool id it may use (4, 3 and 5) is taken";

thread_local! {
    /// This thread's `ThreadMonitor` while it watches through `sys.monitoring` (a strong
    /// reference, held by the registration), else null. No destructor: read on every event.
    static MONITOR: Cell<*mut ffi::PyObject> = const { Cell::new(std::ptr::null_mut()) };
}

/// The exact mode's `on_end`: the thread ends while watched through `sys.monitoring`.
unsafe fn end_of_watched_thread(token: usize) {
    let obj = MONITOR.with(|m| {
        if m.get() as usize == token {
            m.replace(std::ptr::null_mut())
        } else {
            std::ptr::null_mut()
        }
    });
    if !obj.is_null() {
        // The thread state is about to go: the watchdog must stop reading it now.
        (*ThreadMonitor::state_of(obj)).watch = None;
        let py = Python::assume_attached();
        let _saved = crate::errors::SavedError::take();
        if let Err(error) = leave(py, obj) {
            error.write_unraisable(py, None);
        }
    }
}

const END_OF_THREAD_KEY: &std::ffi::CStr = c"loopwatch.monitoring";

/// The interpreter-wide registration: the tool id held and how many threads use it.
struct Registration {
    tool: u8,
    threads: usize,
}

static REGISTRATION: UnderTheGil<Option<Registration>> =
    UnderTheGil(std::cell::UnsafeCell::new(None));

/// Why this backend cannot be used in this process, decided once at import; `None` if it can.
static UNAVAILABLE: OnceLock<Option<&'static str>> = OnceLock::new();

/// Confirms at import that the current interpreter frame can be read (see `threadstate`).
pub fn init() {
    let reason = if unsafe { crate::threadstate::confirm_current_frame() } {
        None
    } else {
        Some("the interpreter frame cannot be read on this build")
    };
    let _ = UNAVAILABLE.set(reason);
}

/// `None` when threads can be watched through `sys.monitoring`, else why not.
pub fn unavailable() -> Option<&'static str> {
    UNAVAILABLE.get().copied().flatten()
}

/// Starts delivering this thread's events to `obj`. Takes a tool id for the process with the
/// first thread. `Ok(false)`: every tool id loopwatch may use is taken by other tools.
///
/// # Safety
/// GIL held; `obj` is a `ThreadMonitor` whose state is ready for events.
pub unsafe fn attach(py: Python<'_>, obj: *mut ffi::PyObject) -> PyResult<bool> {
    if watching().is_some() {
        // The hub keeps one monitor a thread, and detaches it before it attaches again.
        return Err(pyo3::exceptions::PyRuntimeError::new_err(
            "this thread is already watched through sys.monitoring",
        ));
    }
    let registration = &mut *REGISTRATION.0.get();
    if registration.is_none() {
        let Some(tool) = claim_tool(py)? else {
            return Ok(false);
        };
        *registration = Some(Registration { tool, threads: 0 });
    }
    if let Some(registration) = registration.as_mut() {
        registration.threads += 1;
    }
    ffi::Py_INCREF(obj);
    MONITOR.with(|m| m.set(obj));
    guard_thread_end(py, END_OF_THREAD_KEY, obj as usize, end_of_watched_thread)?;
    Ok(true)
}

/// Stops delivering this thread's events; the last thread gives the tool id back.
///
/// # Safety
/// GIL held, on the thread that attached `obj`.
pub unsafe fn detach(py: Python<'_>, obj: *mut ffi::PyObject) -> PyResult<()> {
    let mine = MONITOR.with(|m| {
        if m.get() == obj {
            m.set(std::ptr::null_mut());
            true
        } else {
            false
        }
    });
    if !mine {
        return Ok(());
    }
    unguard_thread_end(END_OF_THREAD_KEY);
    leave(py, obj)
}

/// One thread less on the registration; the last gives the tool id back.
unsafe fn leave(py: Python<'_>, obj: *mut ffi::PyObject) -> PyResult<()> {
    let registration = &mut *REGISTRATION.0.get();
    let last = match registration.as_mut() {
        Some(found) => {
            found.threads -= 1;
            found.threads == 0
        }
        None => false,
    };
    let outcome = match registration.take_if(|_| last) {
        Some(ended) => release_tool(py, ended.tool),
        None => Ok(()),
    };
    ffi::Py_DECREF(obj);
    outcome
}

/// The events loopwatch takes, by their names in `sys.monitoring.events`, with the callback
/// that translates each.
const EVENTS: [(&str, ffi::vectorcallfunc); 9] = [
    ("PY_START", on_python_call),
    ("PY_RESUME", on_python_call),
    ("PY_THROW", on_python_call),
    ("PY_RETURN", on_python_return),
    ("PY_YIELD", on_python_return),
    ("PY_UNWIND", on_python_return),
    ("CALL", on_c_event::<false>),
    ("C_RETURN", on_c_event::<true>),
    ("C_RAISE", on_c_event::<true>),
];

/// Takes the first free tool id of `TOOL_IDS` under `name`; `None` if all are taken.
pub fn use_free_tool_id(py: Python<'_>, name: &str) -> PyResult<Option<u8>> {
    let monitoring = py.import("sys")?.getattr("monitoring")?;
    let Some(tool) = TOOL_IDS.into_iter().find(|&id| {
        monitoring
            .call_method1("get_tool", (id,))
            .is_ok_and(|owner| owner.is_none())
    }) else {
        return Ok(None);
    };
    monitoring.call_method1("use_tool_id", (tool, name))?;
    Ok(Some(tool))
}

/// Whether tool id `tool` is still held under `name` (another tool may have freed it and taken
/// it meanwhile): only then is it ours to give back.
pub fn holds_tool_id(py: Python<'_>, tool: u8, name: &str) -> PyResult<bool> {
    let monitoring = py.import("sys")?.getattr("monitoring")?;
    Ok(monitoring
        .call_method1("get_tool", (tool,))?
        .extract::<Option<String>>()?
        .as_deref()
        == Some(name))
}

/// The events a tool takes, by their names in `sys.monitoring.events`, with their callbacks.
pub type EventTable = [(&'static str, ffi::vectorcallfunc)];

/// Registers each callback of `events` for `tool`; returns the events' mask.
pub fn register_callbacks(py: Python<'_>, tool: u8, events: &EventTable) -> PyResult<u64> {
    let monitoring = py.import("sys")?.getattr("monitoring")?;
    let names = monitoring.getattr("events")?;
    let mut mask: u64 = 0;
    for &(name, callback) in events {
        let event: u64 = names.getattr(name)?.extract()?;
        monitoring.call_method1(
            "register_callback",
            (tool, event, callback_object(py, callback)?),
        )?;
        mask |= event;
    }
    Ok(mask)
}

/// Takes `tool`'s callbacks of `events` away and frees the tool id (its events already off).
pub fn unregister_callbacks_and_free(
    py: Python<'_>,
    tool: u8,
    events: &EventTable,
) -> PyResult<()> {
    let monitoring = py.import("sys")?.getattr("monitoring")?;
    let names = monitoring.getattr("events")?;
    for &(name, _) in events {
        let event: u64 = names.getattr(name)?.extract()?;
        monitoring.call_method1("register_callback", (tool, event, py.None()))?;
    }
    monitoring.call_method1("free_tool_id", (tool,))?;
    Ok(())
}

fn claim_tool(py: Python<'_>) -> PyResult<Option<u8>> {
    let Some(tool) = use_free_tool_id(py, TOOL_NAME)? else {
        return Ok(None);
    };
    let mask = register_callbacks(py, tool, &EVENTS)?;
    py.import("sys")?
        .getattr("monitoring")?
        .call_method1("set_events", (tool, mask))?;
    Ok(Some(tool))
}

fn release_tool(py: Python<'_>, tool: u8) -> PyResult<()> {
    if !holds_tool_id(py, tool, TOOL_NAME)? {
        return Ok(());
    }
    py.import("sys")?
        .getattr("monitoring")?
        .call_method1("set_events", (tool, 0))?;
    unregister_callbacks_and_free(py, tool, &EVENTS)
}

// --- the callbacks: objects CPython calls through vectorcall, with nothing in between ---------

static CALLBACK_TYPE: OnceLock<usize> = OnceLock::new();

fn callback_object(py: Python<'_>, function: ffi::vectorcallfunc) -> PyResult<Bound<'_, PyAny>> {
    let kind = if let Some(&kind) = CALLBACK_TYPE.get() {
        kind as *mut ffi::PyTypeObject
    } else {
        let kind = rust_callable_type(py, c"loopwatch._native.MonitoringCallback", None)?;
        let _ = CALLBACK_TYPE.set(kind as usize);
        kind
    };
    rust_callable(py, kind, function)
}

/// The thread's monitor, if it watches through `sys.monitoring`.
#[inline(always)]
fn watching() -> Option<*mut ffi::PyObject> {
    let obj = MONITOR.with(Cell::get);
    (!obj.is_null()).then_some(obj)
}

/// The instruction offset argument, in bytes; -1 if it is not an int.
unsafe fn offset_of(arg: *mut ffi::PyObject) -> i32 {
    let offset = ffi::PyLong_AsLong(arg);
    if offset == -1 && !ffi::PyErr_Occurred().is_null() {
        ffi::PyErr_Clear();
    }
    offset as i32
}

/// `PY_START`, `PY_RESUME`, `PY_THROW` (code, offset, ...): a Python frame starts or resumes.
unsafe extern "C" fn on_python_call(
    _callback: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    _nargsf: usize,
    _names: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    if let Some(obj) = watching() {
        let code = *args;
        let event = Event::Call(current_interpreter_frame() as u64);
        let origin = || Origin::Code {
            code,
            offset: offset_of(*args.add(1)),
        };
        see(
            obj,
            event,
            |state| fast_code_tag(state.known, code),
            origin,
            Callee::NONE,
        );
    }
    none()
}

/// `PY_RETURN`, `PY_YIELD`, `PY_UNWIND`: a Python frame returns, suspends or raises out.
unsafe extern "C" fn on_python_return(
    _callback: *mut ffi::PyObject,
    _args: *const *mut ffi::PyObject,
    _nargsf: usize,
    _names: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    if let Some(obj) = watching() {
        let event = Event::Return(current_interpreter_frame() as u64);
        see(obj, event, |_| None, || Origin::None, Callee::NONE);
    }
    none()
}

/// The C function a `CALL`/`C_RETURN`/`C_RAISE` event (code, offset, callable, arg0) names,
/// if it is one the legacy hook would see: a builtin function or method, or a method descriptor.
/// A Python function is rejected before any call into the interpreter.
#[inline(always)]
unsafe fn c_callee(args: *const *mut ffi::PyObject) -> Option<(usize, Callee)> {
    let callable = *args.add(2);
    let kind = ffi::Py_TYPE(callable);
    if kind == &raw mut ffi::PyFunction_Type {
        return None;
    }
    let def = c_function_def(callable)?;
    Some((
        def,
        Callee {
            callable,
            self_arg: *args.add(3),
        },
    ))
}

/// `CALL` (`RETURNS` false): any call; a C function's is the start of a C frame. `C_RETURN`,
/// `C_RAISE` (`RETURNS` true): a C function returns or raises.
unsafe extern "C" fn on_c_event<const RETURNS: bool>(
    _callback: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    _nargsf: usize,
    _names: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    if let Some(obj) = watching() {
        if let Some((def, callee)) = c_callee(args) {
            let event = if RETURNS {
                Event::CReturn(def)
            } else {
                Event::CCall(def)
            };
            see(obj, event, |_| None, || Origin::None, callee);
        }
    }
    none()
}

/// One event of a watched thread, read now: the hot path, else the general path. `tag` is what
/// the hot path may know of a call; `origin` is worked out for the general path only.
#[inline(always)]
unsafe fn see(
    obj: *mut ffi::PyObject,
    event: Event,
    tag: impl FnOnce(&State) -> Option<Tag>,
    origin: impl FnOnce() -> Origin,
    callee: Callee,
) {
    let state = &mut *ThreadMonitor::state_of(obj);
    let now = state.clock.now();
    if !hot_event(state, event, tag(state), now) {
        general_event(obj, event, origin(), callee, FrameKeys::Interpreter, now);
    }
}

/// Whether this thread's events go to `obj`.
pub fn is_attached(obj: *mut ffi::PyObject) -> bool {
    MONITOR.with(Cell::get) == obj
}

/// Whether the calling thread is watched through `sys.monitoring` now.
pub fn watched_here() -> bool {
    watching().is_some_and(|obj| unsafe { (*ThreadMonitor::state_of(obj)).tracker.is_some() })
}
