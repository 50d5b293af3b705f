//! Shared by the watches that live outside the profile hook (the exact mode's `sys.monitoring`
//! backend, 3.12+, and the always-on sampler, 3.11+): a guard that tells a watch its thread
//! ended, process-wide values kept under the GIL, and objects whose call is a Rust function.

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

/// A callable object whose call is one Rust function (like CPython's own legacy-event handlers):
/// cheaper to call than a builtin function, which checks the recursion limit on every call.
#[repr(C)]
struct RustCallable {
    ob_base: ffi::PyObject,
    vectorcall: Option<ffi::vectorcallfunc>,
}

/// A new type of `RustCallable`s named `name`; with `bind`, a method descriptor: found on a class,
/// `obj.method()` calls it with `obj` first and nothing bound, and `obj.method` is `bind`'s.
/// Callers keep it for the process's life.
pub fn rust_callable_type(
    py: Python<'_>,
    name: &'static std::ffi::CStr,
    bind: Option<ffi::descrgetfunc>,
) -> PyResult<*mut ffi::PyTypeObject> {
    // Leaked on purpose: a type made from a spec keeps pointing at its members for its life,
    // which is the process's.
    let members: &'static mut [ffi::PyMemberDef; 2] = Box::leak(Box::new([
        ffi::PyMemberDef {
            name: c"__vectorcalloffset__".as_ptr(),
            type_code: ffi::Py_T_PYSSIZET,
            offset: std::mem::offset_of!(RustCallable, vectorcall) as ffi::Py_ssize_t,
            flags: ffi::Py_READONLY,
            doc: std::ptr::null(),
        },
        unsafe { std::mem::zeroed() },
    ]));
    let slot = |slot, pfunc: *mut std::ffi::c_void| ffi::PyType_Slot { slot, pfunc };
    let mut slots = vec![
        slot(ffi::Py_tp_members, members.as_mut_ptr().cast()),
        slot(
            ffi::Py_tp_call,
            ffi::PyVectorcall_Call as *mut std::ffi::c_void,
        ),
    ];
    let mut flags = ffi::Py_TPFLAGS_DEFAULT | ffi::Py_TPFLAGS_HAVE_VECTORCALL;
    if let Some(bind) = bind {
        slots.push(slot(ffi::Py_tp_descr_get, bind as *mut std::ffi::c_void));
        flags |= ffi::Py_TPFLAGS_METHOD_DESCRIPTOR;
    }
    slots.push(slot(0, std::ptr::null_mut()));
    let slots: &'static mut [ffi::PyType_Slot] = slots.leak();
    let spec: &'static mut ffi::PyType_Spec = Box::leak(Box::new(ffi::PyType_Spec {
        name: name.as_ptr(),
        basicsize: std::mem::size_of::<RustCallable>() as std::ffi::c_int,
        itemsize: 0,
        flags: flags as _,
        slots: slots.as_mut_ptr(),
    }));
    let kind = unsafe { ffi::PyType_FromSpec(spec) };
    if kind.is_null() {
        return Err(PyErr::fetch(py));
    }
    Ok(kind.cast())
}

/// A new object of `kind` (made by `rust_callable_type`) whose call is `function`.
pub fn rust_callable(
    py: Python<'_>,
    kind: *mut ffi::PyTypeObject,
    function: ffi::vectorcallfunc,
) -> PyResult<Bound<'_, PyAny>> {
    unsafe {
        let object = ffi::PyType_GenericAlloc(kind, 0);
        if object.is_null() {
            return Err(PyErr::fetch(py));
        }
        (*object.cast::<RustCallable>()).vectorcall = Some(function);
        Ok(Bound::from_owned_ptr(py, object))
    }
}
