//! The binding's side of the slow path: naming frames and C functions, reading lines, the running
//! task and the running loop. Runs only for frames already over the threshold, never per call.

use std::ffi::CStr;
use std::sync::OnceLock;

use loopwatch_core::gil::GilTime;
use loopwatch_core::tracker::FrameRef;
use loopwatch_core::{FrameInfo, GcTime, Resolver, TaskInfo, Ticks};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyModule, PyString, PyType};

use crate::codes::{c_function_def, method_def};
use crate::errors::{attached, SavedError};
use crate::events::Callee;
use crate::locals::local_variable;

struct AsyncioHooks {
    get_running_loop: Py<PyAny>,
    current_task: Py<PyAny>,
    partial_type: Py<PyAny>,
    scope_var: Py<PyAny>,
}

static HOOKS: OnceLock<AsyncioHooks> = OnceLock::new();

/// Finds asyncio's helpers and makes the scope variable, `loopwatch._native.SCOPE`: a context
/// variable that per-request monitoring sets in a task, so that each episode says which scope
/// (request) it belongs to. Tasks inherit it, so work a request spawns is its own too.
pub fn init(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let asyncio = py.import("asyncio")?;
    let scope_var = py
        .import("contextvars")?
        .getattr("ContextVar")?
        .call1(("loopwatch_scope",))?
        .unbind();
    let _ = HOOKS.set(AsyncioHooks {
        get_running_loop: asyncio.getattr("_get_running_loop")?.unbind(),
        current_task: asyncio.getattr("current_task")?.unbind(),
        partial_type: py.import("functools")?.getattr("partial")?.unbind(),
        scope_var: scope_var.clone_ref(py),
    });
    Ok(hooks().scope_var.clone_ref(py))
}

fn hooks() -> &'static AsyncioHooks {
    HOOKS.get().expect("loopwatch._native was initialised")
}

/// What the tracker's keys for Python frames are the addresses of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub enum FrameKeys {
    /// Frame objects (the legacy profile hook).
    Objects,
    /// Interpreter frames (`sys.monitoring`, which hands over no frame object): the frame object
    /// is made only when a frame must be named, by walking the thread's running frames.
    Interpreter,
}

/// Answers the tracker's questions for one event.
pub struct PyResolver<'py> {
    py: Python<'py>,
    /// The C function of the current C event, if any.
    callee: Callee,
    frames: FrameKeys,
}

impl<'py> PyResolver<'py> {
    pub fn new(py: Python<'py>, callee: Callee, frames: FrameKeys) -> Self {
        Self { py, callee, frames }
    }

    /// The frame object of a running frame the tracker keyed, or `None` if it is not running.
    fn frame_object(&self, key: u64) -> Option<*mut ffi::PyFrameObject> {
        match self.frames {
            FrameKeys::Objects => Some(key as *mut ffi::PyFrameObject),
            FrameKeys::Interpreter => unsafe { running_frame_of(key) },
        }
    }

    fn running_loop(&self) -> Option<Bound<'py, PyAny>> {
        let found = hooks().get_running_loop.bind(self.py).call0().ok()?;
        (!found.is_none()).then_some(found)
    }
}

// Every answer is worked out `attached`, so that what it drops is released at once.
impl Resolver for PyResolver<'_> {
    fn describe(&mut self, frame: FrameRef) -> FrameInfo {
        attached(|| self.describe_now(frame))
    }

    fn current_line(&mut self, key: u64) -> Option<u32> {
        let frame = self.frame_object(key)?;
        let line = unsafe { ffi::PyFrame_GetLineNumber(frame) };
        (line > 0).then_some(line as u32)
    }

    fn dispatched_callback(&mut self, dispatcher_key: u64) -> Option<(FrameInfo, bool)> {
        attached(|| self.dispatched_callback_now(dispatcher_key))
    }

    fn task(&mut self) -> TaskInfo {
        attached(|| TaskInfo {
            name: self.task_name_now(),
            scope: self.scope_now(),
        })
    }

    fn loop_is_running(&mut self) -> bool {
        attached(|| {
            let _saved = unsafe { SavedError::take() };
            self.running_loop().is_some()
        })
    }

    fn cpu_wait_ns(&mut self) -> Option<u64> {
        loopwatch_core::cpu_wait::thread_cpu_wait_ns()
    }

    fn gc_within(&mut self, from: Ticks, to: Ticks) -> GcTime {
        loopwatch_core::gc::thread_gc_within(from, to)
    }

    fn gil_within(&mut self, from: Ticks, to: Ticks) -> GilTime {
        crate::watchdog::thread_gil_within(from, to)
    }

    fn thread_names(&mut self, idents: &[u64]) -> Vec<Option<String>> {
        crate::gil::thread_names(self.py, idents)
    }
}

impl<'py> PyResolver<'py> {
    fn describe_now(&mut self, frame: FrameRef) -> FrameInfo {
        let _saved = unsafe { SavedError::take() };
        let described = if frame.is_c {
            let callable = self.callee.callable;
            if frame.returning && unsafe { c_function_def(callable) } == Some(frame.key as usize) {
                unsafe { self.bound_callee() }.and_then(|callee| describe_c_function(&callee))
            } else {
                Ok(describe_method_def(frame.key as *mut ffi::PyMethodDef))
            }
        } else {
            match self.frame_object(frame.key) {
                Some(object) => unsafe { describe_frame(self.py, object, frame.resume) },
                None => Err(pyo3::exceptions::PyLookupError::new_err(
                    "frame not running",
                )),
            }
        };
        described.unwrap_or_else(|_| FrameInfo {
            name: "<unknown>".to_owned(),
            ..FrameInfo::default()
        })
    }

    fn dispatched_callback_now(&mut self, dispatcher_key: u64) -> Option<(FrameInfo, bool)> {
        let _saved = unsafe { SavedError::take() };
        let frame = self.frame_object(dispatcher_key)?;
        let frame = unsafe { Bound::from_borrowed_ptr(self.py, frame.cast()) };
        let handle = local_variable(&frame, "self")?;
        let mut callback = handle.getattr("_callback").ok()?;
        let partial = hooks().partial_type.bind(self.py);
        while callback.is_instance(partial).unwrap_or(false) {
            callback = callback.getattr("func").ok()?;
        }
        if unsafe { method_def(callback.as_ptr()) }.is_some() {
            return describe_c_function(&callback).ok().map(|info| (info, true));
        }
        describe_python_callable(&callback)
            .ok()
            .map(|info| (info, false))
    }

    /// The C function of the event as a Python object: a method descriptor (what
    /// `sys.monitoring` passes for `obj.method()`) bound to the object it was called on, as the
    /// legacy hook sees it and as it is named.
    unsafe fn bound_callee(&self) -> PyResult<Bound<'py, PyAny>> {
        let callable = Bound::from_borrowed_ptr(self.py, self.callee.callable);
        let kind = ffi::Py_TYPE(self.callee.callable);
        if kind != &raw mut ffi::PyMethodDescr_Type || self.callee.self_arg.is_null() {
            return Ok(callable);
        }
        let owner = Bound::from_borrowed_ptr(self.py, self.callee.self_arg);
        callable.call_method1("__get__", (&owner, owner.get_type()))
    }

    /// The scope set in the running context, by its address: the scope object is kept alive
    /// (and its address unique) by whoever set it, for as long as it is set.
    fn scope_now(&mut self) -> Option<u64> {
        let _saved = unsafe { SavedError::take() };
        let scope = hooks()
            .scope_var
            .bind(self.py)
            .call_method1("get", (self.py.None(),))
            .ok()?;
        (!scope.is_none()).then(|| scope.as_ptr() as u64)
    }

    fn task_name_now(&mut self) -> Option<String> {
        let _saved = unsafe { SavedError::take() };
        let running = self.running_loop()?;
        let task = hooks().current_task.bind(self.py).call1((running,)).ok()?;
        if task.is_none() {
            return None;
        }
        task.call_method0("get_name").ok()?.extract().ok()
    }
}

fn module_of_globals(globals: &Bound<'_, PyAny>) -> String {
    let name = globals
        .get_item("__name__")
        .ok()
        .and_then(|n| n.extract::<String>().ok())
        .unwrap_or_else(|| "?".to_owned());
    if name != "__main__" {
        return name;
    }
    // `python -m pkg.mod` runs as __main__; its spec still knows the real name.
    globals
        .get_item("__spec__")
        .ok()
        .filter(|spec| !spec.is_none())
        .and_then(|spec| spec.getattr("name").ok())
        .and_then(|n| n.extract::<String>().ok())
        .unwrap_or(name)
}

fn qualify(module: &str, qualname: &str) -> String {
    if module.is_empty() || module == "builtins" {
        qualname.to_owned()
    } else {
        format!("{module}.{qualname}")
    }
}

/// # Safety
/// `frame` must be a live frame object and the GIL held.
unsafe fn describe_frame(
    py: Python<'_>,
    frame: *mut ffi::PyFrameObject,
    resume: i32,
) -> PyResult<FrameInfo> {
    let frame_obj = Bound::from_borrowed_ptr(py, frame.cast());
    let code = frame_obj.getattr("f_code")?;
    let module = module_of_globals(&frame_obj.getattr("f_globals")?);
    let qualname = qualname_of(&frame_obj, &code)?;
    let line_now = ffi::PyFrame_GetLineNumber(frame);
    let resume_line = (resume > 0).then(|| ffi::PyCode_Addr2Line(code.as_ptr().cast(), resume - 1));
    Ok(FrameInfo {
        name: qualify(&module, &qualname),
        module,
        filename: Some(code.getattr("co_filename")?.extract()?),
        def_line: code.getattr("co_firstlineno")?.extract().ok(),
        line_now: (line_now > 0).then_some(line_now as u32),
        resume_line: resume_line.filter(|&l| l > 0).map(|l| l as u32),
    })
}

/// The function's qualified name. Before 3.11 code objects have no `co_qualname`: a method is
/// recognised by its first argument being `self` or `cls`.
fn qualname_of(frame: &Bound<'_, PyAny>, code: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(qualname) = code.getattr("co_qualname") {
        return qualname.extract();
    }
    let name: String = code.getattr("co_name")?.extract()?;
    let argcount: usize = code.getattr("co_argcount")?.extract()?;
    if argcount > 0 {
        let first: String = code.getattr("co_varnames")?.get_item(0)?.extract()?;
        if first == "self" || first == "cls" {
            if let Some(owner) = local_variable(frame, &first) {
                let owner = if first == "cls" {
                    owner
                } else {
                    owner.get_type().into_any()
                };
                if let Ok(owner_name) = owner.getattr("__qualname__") {
                    return Ok(format!("{}.{name}", owner_name.extract::<String>()?));
                }
            }
        }
    }
    Ok(name)
}

/// Names a builtin function or method: `time.sleep`, `dict.get`,
/// `cryptography.hazmat.bindings._rust.openssl.hashes.Hash.finalize`.
fn describe_c_function(function: &Bound<'_, PyAny>) -> PyResult<FrameInfo> {
    let qualname: String = function.getattr("__qualname__")?.extract()?;
    let owner = function.getattr("__self__").ok().filter(|s| !s.is_none());
    let module = match owner {
        Some(owner) if !owner.is_instance_of::<PyModule>() => {
            let owner_type = if owner.is_instance_of::<PyType>() {
                owner
            } else {
                owner.get_type().into_any()
            };
            owner_type.getattr("__module__")?.extract::<String>()?
        }
        Some(module) => module.getattr("__name__")?.extract::<String>()?,
        None => function
            .getattr("__module__")
            .ok()
            .and_then(|m| m.cast_into::<PyString>().ok())
            .map_or_else(String::new, |m| m.to_string()),
    };
    Ok(FrameInfo {
        name: qualify(&module, &qualname),
        module,
        ..FrameInfo::default()
    })
}

/// Only the method definition is left (a C call still running when monitoring stops).
fn describe_method_def(def: *mut ffi::PyMethodDef) -> FrameInfo {
    let name = unsafe { def.as_ref() }
        .filter(|d| !d.ml_name.is_null())
        .map_or_else(
            || "<C function>".to_owned(),
            |d| {
                unsafe { CStr::from_ptr(d.ml_name) }
                    .to_string_lossy()
                    .into_owned()
            },
        );
    FrameInfo {
        name,
        ..FrameInfo::default()
    }
}

fn describe_python_callable(callable: &Bound<'_, PyAny>) -> PyResult<FrameInfo> {
    let module: String = callable
        .getattr("__module__")
        .ok()
        .and_then(|m| m.extract().ok())
        .unwrap_or_default();
    let qualname: String = callable
        .getattr("__qualname__")
        .or_else(|_| callable.get_type().getattr("__qualname__"))?
        .extract()?;
    let code = callable.getattr("__code__").ok();
    Ok(FrameInfo {
        name: qualify(&module, &qualname),
        module,
        filename: code
            .as_ref()
            .and_then(|c| c.getattr("co_filename").ok()?.extract().ok()),
        def_line: code
            .as_ref()
            .and_then(|c| c.getattr("co_firstlineno").ok()?.extract().ok()),
        ..FrameInfo::default()
    })
}

/// The frame object of the running interpreter frame at `key`, found by walking the thread's
/// frames from the innermost (making their frame objects, as a traceback does). Slow path only.
///
/// # Safety
/// GIL held.
unsafe fn running_frame_of(key: u64) -> Option<*mut ffi::PyFrameObject> {
    let mut frame = ffi::PyEval_GetFrame();
    if frame.is_null() {
        return None;
    }
    ffi::Py_INCREF(frame.cast());
    while !frame.is_null() {
        let found = crate::codes::interpreter_frame_of(frame) == Some(key as usize);
        let back = if found {
            std::ptr::null_mut()
        } else {
            ffi::PyFrame_GetBack(frame)
        };
        // Frames on the running stack stay alive while they run: the address is enough.
        ffi::Py_DECREF(frame.cast());
        if found {
            return Some(frame);
        }
        frame = back;
    }
    None
}
