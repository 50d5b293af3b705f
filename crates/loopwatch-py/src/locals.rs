//! Reading one local variable of a running frame (a method's `self`, a handle's callback) on the
//! slow path, without leaving anything behind that would keep the program's objects alive.

use pyo3::prelude::*;

/// The local variable `name` of a live frame, or `None`.
///
/// Up to 3.12, `frame.f_locals` copies every local into a dict that stays with the frame until the
/// frame ends (or its locals are asked for again): an object the function drops afterwards
/// (`del conn`, or `_run_once`'s `handle` as the next one replaces it) would live on, and be
/// finalized late, for as long as that function runs. So when the frame had no such dict, the one
/// made for this read is dropped again, leaving the frame as it was. From 3.13 on `f_locals` is a
/// view that copies nothing; where the slot could not be confirmed the read is plain.
pub fn local_variable<'py>(frame: &Bound<'py, PyAny>, name: &str) -> Option<Bound<'py, PyAny>> {
    #[cfg(not(Py_3_13))]
    if snapshot::CONFIRMED.load(std::sync::atomic::Ordering::Relaxed) {
        return unsafe { snapshot::read_and_drop(frame, name) };
    }
    frame.getattr("f_locals").ok()?.get_item(name).ok()
}

#[cfg(not(Py_3_13))]
pub use snapshot::confirm_offset;

#[cfg(not(Py_3_13))]
mod snapshot {
    use std::ptr;
    use std::sync::atomic::{AtomicBool, Ordering};

    use pyo3::ffi;
    use pyo3::prelude::*;

    /// Where a frame keeps its snapshot of locals (from the headers), confirmed at import:
    /// 3.9 and 3.10, `PyFrameObject.f_locals`.
    #[cfg(not(Py_3_11))]
    const OFFSET: usize = 56;
    /// 3.11 and 3.12: `PyFrameObject.f_frame`, the interpreter frame (the frame object's own
    /// copy once the frame has ended), whose `f_locals` is at `LOCALS`.
    #[cfg(Py_3_11)]
    const F_FRAME: usize = 24;
    #[cfg(all(Py_3_11, not(Py_3_12)))]
    const LOCALS: usize = 24;
    #[cfg(Py_3_12)]
    const LOCALS: usize = 40;
    /// 3.11 and 3.12: `PyFrameObject.f_fast_as_locals`, set by that copy; put back as it was.
    #[cfg(Py_3_11)]
    const FAST_AS_LOCALS: usize = 46;

    pub static CONFIRMED: AtomicBool = AtomicBool::new(false);

    #[allow(clippy::cast_ptr_alignment)] // the offset of an aligned pointer field
    #[cfg(not(Py_3_11))]
    unsafe fn slot(frame: &Bound<'_, PyAny>) -> *mut *mut ffi::PyObject {
        frame
            .as_ptr()
            .cast::<u8>()
            .add(OFFSET)
            .cast::<*mut ffi::PyObject>()
    }

    #[allow(clippy::cast_ptr_alignment)] // the offsets of aligned pointer fields
    #[cfg(Py_3_11)]
    unsafe fn slot(frame: &Bound<'_, PyAny>) -> *mut *mut ffi::PyObject {
        let interpreter_frame = frame
            .as_ptr()
            .cast::<u8>()
            .add(F_FRAME)
            .cast::<*mut u8>()
            .read();
        interpreter_frame.add(LOCALS).cast::<*mut ffi::PyObject>()
    }

    /// # Safety
    /// `frame` must be a frame object and `CONFIRMED` set.
    pub unsafe fn read_and_drop<'py>(
        frame: &Bound<'py, PyAny>,
        name: &str,
    ) -> Option<Bound<'py, PyAny>> {
        let slot = slot(frame);
        let had_dict = !slot.read().is_null();
        #[cfg(Py_3_11)]
        let flag = frame.as_ptr().cast::<u8>().add(FAST_AS_LOCALS);
        #[cfg(Py_3_11)]
        let flag_was = flag.read();
        let value = frame
            .getattr("f_locals")
            .ok()
            .and_then(|locals| locals.get_item(name).ok());
        if !had_dict {
            let made = slot.replace(ptr::null_mut());
            #[cfg(Py_3_11)]
            flag.write(flag_was);
            if !made.is_null() {
                ffi::Py_DECREF(made);
            }
        }
        value
    }

    /// Trusts the offsets only if, on a function frame nobody has asked for its locals, they read
    /// nothing before `f_locals` and exactly that dict after (and the flag the copy sets).
    pub fn confirm_offset(py: Python<'_>) -> PyResult<()> {
        let frame = py.eval(c"(lambda: __import__('sys')._getframe())()", None, None)?;
        let slot = unsafe { slot(&frame) };
        let before = unsafe { slot.read() };
        #[cfg(Py_3_11)]
        let flag = unsafe { frame.as_ptr().cast::<u8>().add(FAST_AS_LOCALS) };
        #[cfg(Py_3_11)]
        let flag_before = unsafe { flag.read() };
        let locals = frame.getattr("f_locals")?;
        let confirmed = before.is_null() && unsafe { slot.read() } == locals.as_ptr();
        #[cfg(Py_3_11)]
        let confirmed = confirmed && flag_before == 0 && unsafe { flag.read() } == 1;
        CONFIRMED.store(confirmed, Ordering::Relaxed);
        Ok(())
    }
}

/// For loopwatch's Python side: `local_variable` of a frame object (None for anything else).
#[pyfunction]
pub fn _local_variable<'py>(frame: &Bound<'py, PyAny>, name: &str) -> Option<Bound<'py, PyAny>> {
    if !frame.is_instance_of::<pyo3::types::PyFrame>() {
        return None;
    }
    local_variable(frame, name)
}
