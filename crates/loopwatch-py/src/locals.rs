//! Reading one local variable of a running frame (a method's `self`, a handle's callback) on the
//! slow path, without leaving anything behind that would keep the program's objects alive.

use pyo3::prelude::*;

/// The local variable `name` of a live frame, or `None`.
///
/// Before 3.11, `frame.f_locals` copies every local into a dict that stays on the frame until the
/// frame ends: an object the function deletes afterwards (`del conn`) would live on, and be
/// finalized late, for as long as that function runs. So when the frame had no such dict, the one
/// made for this read is dropped again, leaving the frame as it was. From 3.11 (and where the
/// offset could not be confirmed) the read is plain: 3.11 and 3.12 keep a snapshot too, but only
/// dispatcher frames (`Handle._run`, whose one local is `self`) are read there, and from 3.13 on
/// `f_locals` is a view that copies nothing.
pub fn local_variable<'py>(frame: &Bound<'py, PyAny>, name: &str) -> Option<Bound<'py, PyAny>> {
    #[cfg(not(Py_3_11))]
    if legacy::CONFIRMED.load(std::sync::atomic::Ordering::Relaxed) {
        return unsafe { legacy::read_and_drop_snapshot(frame, name) };
    }
    frame.getattr("f_locals").ok()?.get_item(name).ok()
}

#[cfg(not(Py_3_11))]
pub use legacy::confirm_offset;

#[cfg(not(Py_3_11))]
mod legacy {
    use std::ptr;
    use std::sync::atomic::{AtomicBool, Ordering};

    use pyo3::ffi;
    use pyo3::prelude::*;

    /// `PyFrameObject.f_locals` on 3.9 and 3.10 (from the headers), confirmed at import.
    const OFFSET: usize = 56;

    pub static CONFIRMED: AtomicBool = AtomicBool::new(false);

    #[allow(clippy::cast_ptr_alignment)] // the offset of an aligned pointer field
    unsafe fn slot(frame: &Bound<'_, PyAny>) -> *mut *mut ffi::PyObject {
        frame
            .as_ptr()
            .cast::<u8>()
            .add(OFFSET)
            .cast::<*mut ffi::PyObject>()
    }

    /// # Safety
    /// `frame` must be a frame object and `CONFIRMED` set.
    pub unsafe fn read_and_drop_snapshot<'py>(
        frame: &Bound<'py, PyAny>,
        name: &str,
    ) -> Option<Bound<'py, PyAny>> {
        let slot = slot(frame);
        let had_dict = !slot.read().is_null();
        let value = frame
            .getattr("f_locals")
            .ok()
            .and_then(|locals| locals.get_item(name).ok());
        if !had_dict {
            let made = slot.replace(ptr::null_mut());
            if !made.is_null() {
                ffi::Py_DECREF(made);
            }
        }
        value
    }

    /// Trusts the offset only if, on a function frame nobody has asked for its locals, it reads
    /// nothing before `f_locals` and exactly that dict after.
    pub fn confirm_offset(py: Python<'_>) -> PyResult<()> {
        let frame = py.eval(c"(lambda: __import__('sys')._getframe())()", None, None)?;
        let slot = unsafe { slot(&frame) };
        let before = unsafe { slot.read() };
        let locals = frame.getattr("f_locals")?;
        let confirmed = before.is_null() && unsafe { slot.read() } == locals.as_ptr();
        CONFIRMED.store(confirmed, Ordering::Relaxed);
        Ok(())
    }
}
