//! Shared by the watches that live outside the profile hook (the exact mode's `sys.monitoring`
//! backend, 3.12+, and the always-on sampler, 3.11+): a guard that tells a watch its thread
//! ended, and process-wide values kept under the GIL.

use pyo3::ffi;
use pyo3::prelude::*;

/// Put in the thread's state dict while a thread is watched: a thread that ends still watched
/// has that dict cleared on its way out, on its own thread with the GIL held, and so gives its
/// share of a tool id back (the legacy hook is dropped by CPython the same way). Shared by the
/// exact mode's watch and the always-on sampler's, each under its own key.
#[pyclass(module = "loopwatch._native")]
pub struct EndOfThread {
    /// What it stands for (a monitor's address): one that replaced it, or a detach, leaves
    /// nothing to do.
    token: usize,
    on_end: unsafe fn(usize),
}

impl Drop for EndOfThread {
    fn drop(&mut self) {
        unsafe { (self.on_end)(self.token) };
    }
}

/// Puts an `EndOfThread` calling `on_end(token)` in the calling thread's state dict at `key`.
///
/// # Safety
/// GIL held.
pub unsafe fn guard_thread_end(
    py: Python<'_>,
    key: &std::ffi::CStr,
    token: usize,
    on_end: unsafe fn(usize),
) -> PyResult<()> {
    let guard = Bound::new(py, EndOfThread { token, on_end })?;
    let dict = ffi::PyThreadState_GetDict();
    if dict.is_null() || ffi::PyDict_SetItemString(dict, key.as_ptr(), guard.as_ptr()) != 0 {
        ffi::PyErr_Clear();
        // Not kept by the thread: dropping it now would end the watch it stands for.
        std::mem::forget(guard);
    }
    Ok(())
}

/// Takes the calling thread's guard at `key` away (its `on_end` runs, and finds nothing to do).
///
/// # Safety
/// GIL held.
pub unsafe fn unguard_thread_end(key: &std::ffi::CStr) {
    let dict = ffi::PyThreadState_GetDict();
    if dict.is_null() || ffi::PyDict_DelItemString(dict, key.as_ptr()) != 0 {
        ffi::PyErr_Clear();
    }
}

/// A process-wide value touched only with the GIL held (install and uninstall are Python calls).
pub struct UnderTheGil<T>(pub std::cell::UnsafeCell<T>);
// SAFETY: every access holds the GIL, which serializes them.
unsafe impl<T> Sync for UnderTheGil<T> {}

/// A new reference to `None`, what a callback returns.
#[cfg(Py_3_12)]
#[inline(always)]
pub unsafe fn none() -> *mut ffi::PyObject {
    let none = ffi::Py_None();
    ffi::Py_INCREF(none);
    none
}
