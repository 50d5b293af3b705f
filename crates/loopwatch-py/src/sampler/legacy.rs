//! With no `sys.monitoring`, the class attribute `asyncio.events.Handle._run` is replaced,
//! while any thread is watched, by a callable of loopwatch's own that times the call of the
//! original function around it: one C call more per callback, and no frame (the original's
//! frame, the unit's boundary on the stack, is as it was). It is a method descriptor, so
//! `handle._run()` calls it with the handle and nothing is bound. It is put back when the
//! last thread stops, unless the program has put something else there meanwhile.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;

use super::{
    attached, last_thread_leaves, sampling, unit_over_threshold, Registration, ThreadSampler,
    HANDLE_RUN, REGISTRATION,
};
use crate::threadend::{rust_callable, rust_callable_type};

/// The original `Handle._run` (a strong reference kept for the process's life once taken:
/// a wrapper the program kept a reference to still calls it).
static ORIGINAL: AtomicUsize = AtomicUsize::new(0);

extern "C" {
    fn PyMethod_New(
        function: *mut ffi::PyObject,
        instance: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
}

/// `handle._run` read as an attribute (not called at once): bound as a function would be.
unsafe extern "C" fn bind(
    descriptor: *mut ffi::PyObject,
    instance: *mut ffi::PyObject,
    _owner: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    if instance.is_null() || instance == ffi::Py_None() {
        ffi::Py_INCREF(descriptor);
        return descriptor;
    }
    PyMethod_New(descriptor, instance)
}

static TIMED_RUN_TYPE: OnceLock<usize> = OnceLock::new();

fn timed_run_type(py: Python<'_>) -> PyResult<*mut ffi::PyTypeObject> {
    if let Some(&kind) = TIMED_RUN_TYPE.get() {
        return Ok(kind as *mut ffi::PyTypeObject);
    }
    let kind = rust_callable_type(py, c"loopwatch._native.TimedHandleRun", Some(bind))?;
    let _ = TIMED_RUN_TYPE.set(kind as usize);
    Ok(kind)
}

/// `handle._run()`: the unit starts, the original runs, the unit ends.
unsafe extern "C" fn run(
    _callable: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: usize,
    names: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let original = ORIGINAL.load(Ordering::Relaxed) as *mut ffi::PyObject;
    if let Some(obj) = sampling() {
        let state = &mut *ThreadSampler::state_of(obj);
        if state.installed {
            let open = state.unit.take().filter(|_| state.end_unseen);
            state.end_unseen = false;
            if let Some(open) = open {
                // The unit the watch started in has ended (see `State::open_handle`).
                let now = state.clock.now();
                let handle = state.open_handle.take();
                if now.saturating_sub(open) >= state.threshold {
                    let handle = handle.as_ref().map_or(std::ptr::null_mut(), Py::as_ptr);
                    attached(|| unit_over_threshold(obj, state, (open, now), handle));
                }
            }
            let started = state.clock.now();
            state.unit = Some(started);
            if let Some(watch) = state.watch.as_mut() {
                watch.publish(Some(started));
            }
        }
    }
    let result = ffi::PyObject_Vectorcall(original, args, nargsf, names);
    // Looked up again: the callback may have stopped (or started) the watch.
    if let Some(obj) = sampling() {
        let state = &mut *ThreadSampler::state_of(obj);
        if let (true, Some(started)) = (state.installed, state.unit.take()) {
            let now = state.clock.now();
            if now.saturating_sub(started) < state.threshold {
                if let Some(watch) = state.watch.as_mut() {
                    watch.publish(None);
                }
            } else {
                let handle = if ffi::PyVectorcall_NARGS(nargsf) >= 1 {
                    *args
                } else {
                    std::ptr::null_mut()
                };
                attached(|| unit_over_threshold(obj, state, (started, now), handle));
            }
        }
    }
    result
}

/// The watch starts inside a unit whose end it will not see: keeps its handle for its
/// report, and has the loop run a callback of loopwatch's own (`int()`, nothing) at its next
/// turn, whose start ends it, even if the loop then has nothing else to do.
pub(super) fn end_this_unit_soon(py: Python<'_>, state: &mut super::State) -> PyResult<()> {
    let frame = unsafe { super::running_handle_run() };
    if !frame.is_null() {
        let frame = unsafe { Bound::from_owned_ptr(py, frame.cast()) };
        let handle = crate::locals::local_variable(&frame, "self");
        state.open_handle = handle.map(Bound::unbind);
    }
    state.end_unseen = true;
    let running = py
        .import("asyncio.events")?
        .call_method0("_get_running_loop")?;
    if !running.is_none() {
        running.call_method1("call_soon", (py.get_type::<pyo3::types::PyInt>(),))?;
    }
    Ok(())
}

fn handle_class(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    py.import("asyncio.events")?.getattr("Handle")
}

/// The class's own `_run`, not an inherited one.
fn own_run<'py>(handle: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    handle.getattr("__dict__")?.get_item("_run")
}

/// One more thread is watched: the first puts the timed callable in place.
pub(super) fn register(py: Python<'_>) -> PyResult<()> {
    let registration = unsafe { &mut *REGISTRATION.0.get() };
    if let Some(found) = registration.as_mut() {
        found.threads += 1;
        return Ok(());
    }
    let handle = handle_class(py)?;
    let original = own_run(&handle)?;
    let Ok(code) = original.getattr("__code__") else {
        return Err(PyRuntimeError::new_err(
            "the always-on mode times asyncio's Handle._run, which is not a Python function here",
        ));
    };
    HANDLE_RUN.store(code.as_ptr() as usize, Ordering::Relaxed);
    // Kept for the process's life: see `ORIGINAL`.
    ORIGINAL.store(original.clone().into_ptr() as usize, Ordering::Relaxed);
    handle.setattr("_run", rust_callable(py, timed_run_type(py)?, run)?)?;
    *registration = Some(Registration {
        original: original.unbind(),
        threads: 1,
    });
    Ok(())
}

/// One thread less; the last puts the original back, if the timed callable is still there.
pub(super) fn unregister(py: Python<'_>) -> PyResult<()> {
    let Some(ended) = last_thread_leaves() else {
        return Ok(());
    };
    HANDLE_RUN.store(0, Ordering::Relaxed);
    let handle = handle_class(py)?;
    let ours_type = timed_run_type(py)?.cast::<ffi::PyObject>();
    let ours = own_run(&handle).is_ok_and(|now| now.get_type().as_ptr() == ours_type);
    if ours {
        handle.setattr("_run", ended.original.bind(py))?;
    }
    Ok(())
}
