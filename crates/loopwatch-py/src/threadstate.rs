//! Reading the thread's current profile function, so that deactivation restores exactly what was
//! there (a `sys.setprofile` function, cProfile, another tool's C hook). `PyThreadState` is not in
//! pyo3-ffi; the offsets below are `offsetof` values from each version's headers, checked at run
//! time by reading back our own hook after installing it.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::ffi;

#[cfg(not(Py_3_11))]
const PROFILE_FUNC_OFFSET: usize = 56;
#[cfg(all(Py_3_11, not(Py_3_13)))]
const PROFILE_FUNC_OFFSET: usize = 64;
// 3.14 adds `holds_gil` and drops `c_recursion_remaining`: the same offset as 3.13.
#[cfg(all(Py_3_13, not(Py_3_15)))]
const PROFILE_FUNC_OFFSET: usize = 80;
// 3.15 adds `gil_requested`, `base_frame`, `last_profiled_frame` and its sequence number.
#[cfg(Py_3_15)]
const PROFILE_FUNC_OFFSET: usize = 104;
/// `c_profileobj` follows `c_profilefunc` and `c_tracefunc` in every supported version.
const PROFILE_OBJ_OFFSET: usize = PROFILE_FUNC_OFFSET + 16;

static LAYOUT_VERIFIED: AtomicBool = AtomicBool::new(true);

/// `LOOPWATCH_PORTABLE_THREAD_STATE` set: never read the thread state, as on a build whose
/// layout does not match (what the tests use to check that fallback).
pub fn init() {
    if std::env::var_os("LOOPWATCH_PORTABLE_THREAD_STATE").is_some() {
        LAYOUT_VERIFIED.store(false, Ordering::Relaxed);
    }
}

/// A thread's profile function and its argument, as `PyEval_SetProfile` takes them.
#[derive(Clone, Copy, Debug)]
pub struct ProfileSlot {
    pub func: Option<ffi::Py_tracefunc>,
    pub obj: *mut ffi::PyObject,
}

/// The profile function installed on the calling thread (borrowed references).
///
/// # Safety
/// The caller must hold the GIL.
#[allow(clippy::cast_ptr_alignment)] // both offsets are 8-aligned pointer fields of the C struct
pub unsafe fn current() -> Option<ProfileSlot> {
    if !LAYOUT_VERIFIED.load(Ordering::Relaxed) {
        return None;
    }
    let tstate = ffi::PyThreadState_Get().cast::<u8>();
    let func = tstate
        .add(PROFILE_FUNC_OFFSET)
        .cast::<Option<ffi::Py_tracefunc>>()
        .read();
    let obj = tstate
        .add(PROFILE_OBJ_OFFSET)
        .cast::<*mut ffi::PyObject>()
        .read();
    Some(ProfileSlot { func, obj })
}

/// Checks the layout against a profile function we just installed; on a mismatch, stops
/// trusting it for good (deactivation then falls back to `sys.getprofile()`).
///
/// # Safety
/// The caller must hold the GIL.
pub unsafe fn verify(expected: ProfileSlot) -> bool {
    let ok = current().is_some_and(|seen| {
        seen.obj == expected.obj
            && seen.func.map(|f| f as *const c_void) == expected.func.map(|f| f as *const c_void)
    });
    if !ok {
        LAYOUT_VERIFIED.store(false, Ordering::Relaxed);
    }
    ok
}

/// `PyThreadState.cframe` (3.12), whose first field is the current interpreter frame, or
/// `PyThreadState.current_frame` (3.13-3.15): `offsetof` values from each version's headers.
#[cfg(all(Py_3_12, not(Py_3_13)))]
const CURRENT_FRAME_OFFSET: usize = 56;
#[cfg(Py_3_13)]
const CURRENT_FRAME_OFFSET: usize = 72;

/// The interpreter frame running on the calling thread: what `sys.monitoring` events of Python
/// code are keyed by, since they carry no frame. Trusted only once `confirm_current_frame` said so.
///
/// # Safety
/// The caller must hold the GIL.
#[cfg(Py_3_12)]
#[inline(always)]
#[allow(clippy::cast_ptr_alignment)] // an 8-aligned pointer field of the C struct
pub unsafe fn current_interpreter_frame() -> usize {
    let tstate = ffi::PyThreadState_Get().cast::<u8>();
    let field = tstate.add(CURRENT_FRAME_OFFSET).cast::<usize>().read();
    if cfg!(Py_3_13) {
        field
    } else {
        // 3.12: the field is the `_PyCFrame *`, whose first member is the frame.
        (field as *const usize).read()
    }
}

/// Whether `current_interpreter_frame` reads what the C API says is running: the frame of the
/// Python code that is calling into loopwatch now. The versions whose headers were not read, and
/// free-threaded builds, are never trusted.
///
/// # Safety
/// The caller must hold the GIL, called from Python code.
#[cfg(Py_3_12)]
pub unsafe fn confirm_current_frame() -> bool {
    if cfg!(Py_3_16) || cfg!(Py_GIL_DISABLED) || !LAYOUT_VERIFIED.load(Ordering::Relaxed) {
        return false;
    }
    let frame = ffi::PyEval_GetFrame();
    !frame.is_null()
        && crate::codes::interpreter_frame_of(frame) == Some(current_interpreter_frame())
}
