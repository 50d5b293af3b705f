//! The benchmark floor: a profile hook that returns at once. Any profile-hook tool pays at least
//! what this costs, so loopwatch's overhead is stated as a ratio to it. Not for production use.

use std::ffi::c_int;

use pyo3::ffi;
use pyo3::prelude::*;

unsafe extern "C" fn empty_hook(
    _obj: *mut ffi::PyObject,
    _frame: *mut ffi::PyFrameObject,
    _what: c_int,
    _arg: *mut ffi::PyObject,
) -> c_int {
    0
}

/// Installs the empty hook on the calling thread (benchmarks only).
#[pyfunction]
pub fn _bench_install_empty_hook() {
    unsafe { ffi::PyEval_SetProfile(Some(empty_hook), std::ptr::null_mut()) };
}

/// Removes any profile function from the calling thread (benchmarks only).
#[pyfunction]
pub fn _bench_uninstall_hook() {
    unsafe { ffi::PyEval_SetProfile(None, std::ptr::null_mut()) };
}
