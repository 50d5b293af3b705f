//! Keeping a pending exception intact: the hook can run while one is being raised, and anything
//! the slow path does must leave it exactly as it was.

use pyo3::ffi;

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
