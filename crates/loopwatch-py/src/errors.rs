//! Keeping the interpreter's state intact on the slow path: a pending exception is put back
//! exactly as it was, and references dropped there are released at once.

use pyo3::ffi;
use pyo3::Python;

/// Runs `f` with pyo3 told that this thread is attached to the interpreter. The hook is entered
/// straight from C, where pyo3 does not know it; without this, every reference or error dropped
/// on the slow path would wait in pyo3's deferred-release pool (a growing list) until the next
/// call into a pyo3 method. Cheap where pyo3 already knows; used only off the hot path.
pub fn attached<R>(f: impl FnOnce() -> R) -> R {
    Python::attach(|_| f())
}

/// Takes the pending exception (if any) and puts it back when dropped.
pub struct SavedError {
    #[cfg(Py_3_12)]
    exception: *mut ffi::PyObject,
    #[cfg(not(Py_3_12))]
    parts: (*mut ffi::PyObject, *mut ffi::PyObject, *mut ffi::PyObject),
}

impl SavedError {
    /// # Safety
    /// The GIL must be held.
    #[allow(deprecated)] // PyErr_Fetch is the only way before 3.12
    pub unsafe fn take() -> Self {
        #[cfg(Py_3_12)]
        {
            Self {
                exception: ffi::PyErr_GetRaisedException(),
            }
        }
        #[cfg(not(Py_3_12))]
        {
            let mut parts = (
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            ffi::PyErr_Fetch(&raw mut parts.0, &raw mut parts.1, &raw mut parts.2);
            Self { parts }
        }
    }
}

impl Drop for SavedError {
    #[allow(deprecated)]
    fn drop(&mut self) {
        unsafe {
            // Anything the slow path left behind is ours, never the user's.
            ffi::PyErr_Clear();
            #[cfg(Py_3_12)]
            ffi::PyErr_SetRaisedException(self.exception);
            #[cfg(not(Py_3_12))]
            ffi::PyErr_Restore(self.parts.0, self.parts.1, self.parts.2);
        }
    }
}
