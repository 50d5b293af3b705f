//! Per-code-object tags (coroutine? the loop's `run_forever`? a dispatcher?), read on the hot
//! path straight from the interpreter's structs, or through the C API and a `co_extra` cache.

use std::ffi::c_void;
use std::ptr;
use std::sync::OnceLock;

use loopwatch_core::Tag;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::errors::SavedError;

/// Interpreter objects that identify the loop's machinery, found once at import.
pub struct Known {
    pub extra_index: ffi::Py_ssize_t,
    handle_run_code: usize,
    run_forever_code: usize,
    /// `Context.run`'s method definition: how C dispatch is recognized at `c_call`.
    pub context_run_def: usize,
    /// Where frames keep their code object, when that was confirmed at import.
    layout: Option<CodeLayout>,
    // Strong references keep the identities above valid for the life of the process.
    _keep: Vec<Py<PyAny>>,
}

// The raw addresses are only compared, never dereferenced without the GIL.
unsafe impl Send for Known {}
unsafe impl Sync for Known {}

static KNOWN: OnceLock<Known> = OnceLock::new();

const COROUTINE_FLAGS: std::ffi::c_long = 0x0080 | 0x0100 | 0x0200; // CO_COROUTINE | CO_ITERABLE_COROUTINE | CO_ASYNC_GENERATOR

pub fn known() -> &'static Known {
    KNOWN.get().expect("loopwatch._native was initialised")
}

/// Finds the loop's machinery. Called once when the module is imported.
pub fn init(py: Python<'_>) -> PyResult<()> {
    if KNOWN.get().is_some() {
        return Ok(());
    }
    let handle_run = py
        .import("asyncio.events")?
        .getattr("Handle")?
        .getattr("_run")?
        .getattr("__code__")?;
    let run_forever = py
        .import("asyncio.base_events")?
        .getattr("BaseEventLoop")?
        .getattr("run_forever")?
        .getattr("__code__")?;
    let context_run = py
        .import("contextvars")?
        .call_method0("copy_context")?
        .getattr("run")?;
    let context_run_def = unsafe { method_def(context_run.as_ptr()) }.ok_or_else(|| {
        pyo3::exceptions::PyRuntimeError::new_err("Context.run is not a builtin method")
    })?;
    let extra_index = unsafe { ffi::PyUnstable_Eval_RequestCodeExtraIndex(keep_tag) };
    if extra_index < 0 {
        return Err(PyErr::fetch(py));
    }
    let layout = if std::env::var_os("LOOPWATCH_PORTABLE_CODE_READS").is_some() {
        None
    } else {
        CodeLayout::confirmed(py)?
    };
    let _ = KNOWN.set(Known {
        extra_index,
        handle_run_code: handle_run.as_ptr() as usize,
        run_forever_code: run_forever.as_ptr() as usize,
        context_run_def,
        layout,
        _keep: vec![
            handle_run.unbind(),
            run_forever.unbind(),
            context_run.unbind(),
        ],
    });
    Ok(())
}

/// Our `co_extra` values are small integers, not allocations: nothing to free.
unsafe extern "C" fn keep_tag(_: *mut c_void) {}

/// The `PyMethodDef` of a builtin function or method: a stable key for a C function, where the
/// callable itself may be a fresh bound-method object at each event (3.12+).
///
/// # Safety
/// `callable` must be a valid object pointer.
pub unsafe fn method_def(callable: *mut ffi::PyObject) -> Option<usize> {
    if callable.is_null() || ffi::PyCFunction_Check(callable) == 0 {
        return None;
    }
    let def = (*callable.cast::<ffi::PyCFunctionObject>()).m_ml;
    (!def.is_null()).then_some(def as usize)
}

/// `method_def` for the two exact builtin types (nearly every C event), without the subtype
/// check's call into the interpreter; `None` leaves the rest to `method_def`.
///
/// # Safety
/// `callable` must be a valid object pointer.
#[inline(always)]
pub unsafe fn exact_method_def(callable: *mut ffi::PyObject) -> Option<usize> {
    if callable.is_null() {
        return None;
    }
    let kind = ffi::Py_TYPE(callable);
    if kind != &raw mut ffi::PyCFunction_Type && kind != &raw mut ffi::PyCMethod_Type {
        return None;
    }
    let def = (*callable.cast::<ffi::PyCFunctionObject>()).m_ml;
    (!def.is_null()).then_some(def as usize)
}

/// The `PyMethodDef` of the C function a `sys.monitoring` C event names: a builtin function or
/// method (of the exact types first, without a call into the interpreter), or a method
/// descriptor (`obj.method()` is called through the descriptor, with no bound method made).
///
/// # Safety
/// `callable` must be a valid object pointer.
#[inline(always)]
pub unsafe fn c_function_def(callable: *mut ffi::PyObject) -> Option<usize> {
    if let Some(def) = exact_method_def(callable) {
        return Some(def);
    }
    if callable.is_null() {
        return None;
    }
    if ffi::Py_TYPE(callable) == &raw mut ffi::PyMethodDescr_Type {
        let def = (*callable.cast::<ffi::PyMethodDescrObject>()).d_method;
        return (!def.is_null()).then_some(def as usize);
    }
    method_def(callable)
}

/// The interpreter frame a frame object stands for (3.11+), where the layout was confirmed.
///
/// # Safety
/// GIL held; `frame` is a live frame object.
#[allow(clippy::cast_ptr_alignment)] // the offset of an aligned pointer field
pub unsafe fn interpreter_frame_of(frame: *mut ffi::PyFrameObject) -> Option<usize> {
    let offset = known().layout?.interpreter_frame?;
    Some(frame.cast::<u8>().add(offset).cast::<usize>().read())
}

/// The tag of a code object `sys.monitoring` passed: its flags read straight from the struct
/// where the layout was confirmed, else through the C API and the `co_extra` cache.
///
/// # Safety
/// GIL held; `code` is a live object.
#[inline(always)]
pub unsafe fn fast_code_tag(known: &Known, code: *mut ffi::PyObject) -> Option<Tag> {
    let layout = known.layout?;
    (ffi::Py_TYPE(code) == &raw mut ffi::PyCode_Type)
        .then(|| tag_for(known, code as usize, layout.flags_of(code).into()))
}

/// `fast_code_tag`, or the portable read where it has no answer.
///
/// # Safety
/// As `fast_code_tag`.
pub unsafe fn code_tag(known: &Known, code: *mut ffi::PyObject) -> Tag {
    match fast_code_tag(known, code) {
        Some(tag) => tag,
        None if ffi::PyCode_Check(code) != 0 => tag_of(known, code.cast()),
        None => Tag::PLAIN,
    }
}

/// Where a frame keeps its code object and a code object its flags: offsets from each
/// version's headers, trusted only after `confirmed` compared them with the C API.
#[derive(Clone, Copy)]
struct CodeLayout {
    /// 3.11+: `PyFrameObject.f_frame`, the interpreter frame that holds the code.
    interpreter_frame: Option<usize>,
    /// `f_code` (3.9-3.12) or `f_executable` (3.13+) in whichever frame holds it.
    code: usize,
    /// Bits of that field that are not the pointer: from 3.14 `f_executable` is a `_PyStackRef`,
    /// whose lowest bit marks a deferred reference (`Py_TAG_REFCNT`).
    tag_bits: usize,
    /// `PyCodeObject.co_flags`.
    flags: usize,
}

const HEADER_LAYOUT: CodeLayout = if cfg!(Py_3_14) {
    CodeLayout {
        interpreter_frame: Some(24),
        code: 0,
        tag_bits: 1,
        flags: 48,
    }
} else if cfg!(Py_3_12) {
    CodeLayout {
        interpreter_frame: Some(24),
        code: 0,
        tag_bits: 0,
        flags: 48,
    }
} else if cfg!(Py_3_11) {
    CodeLayout {
        interpreter_frame: Some(24),
        code: 32,
        tag_bits: 0,
        flags: 48,
    }
} else {
    CodeLayout {
        interpreter_frame: None,
        code: 32,
        tag_bits: 0,
        flags: 36,
    }
};

// Every offset is that of an aligned pointer or `int` field of the C struct.
#[allow(clippy::cast_ptr_alignment)]
impl CodeLayout {
    #[inline(always)]
    unsafe fn code_of(self, frame: *mut ffi::PyFrameObject) -> *mut ffi::PyObject {
        let mut holder = frame.cast::<u8>();
        if let Some(offset) = self.interpreter_frame {
            holder = holder.add(offset).cast::<*mut u8>().read();
        }
        let field = holder.add(self.code).cast::<usize>().read();
        (field & !self.tag_bits) as *mut ffi::PyObject
    }

    #[inline(always)]
    unsafe fn flags_of(self, code: *mut ffi::PyObject) -> std::ffi::c_int {
        code.cast::<u8>()
            .add(self.flags)
            .cast::<std::ffi::c_int>()
            .read()
    }

    /// The header layout if, on every frame running now and on a suspended generator's frame,
    /// it reads the same code object and flags as the C API does; otherwise `None` (the
    /// portable path). Versions whose headers were not read get the portable path outright:
    /// the check itself follows a pointer at the assumed offset.
    fn confirmed(py: Python<'_>) -> PyResult<Option<CodeLayout>> {
        // Offsets are read from the headers of 3.9-3.15 (default builds); a newer version or
        // a free-threaded build (other frame and object headers) gets the portable path.
        if cfg!(Py_3_16) || cfg!(Py_GIL_DISABLED) {
            return Ok(None);
        }
        let layout = HEADER_LAYOUT;
        let probe = py.eval(c"(lambda: (yield))().gi_frame", None, None)?;
        let mut frames = vec![probe];
        let mut frame = Some(py.import("sys")?.call_method0("_getframe")?);
        while let Some(current) = frame {
            let back = current.getattr("f_back")?;
            frames.push(current);
            frame = (!back.is_none()).then_some(back);
        }
        for frame in &frames {
            let code = frame.getattr("f_code")?;
            let flags: std::ffi::c_int = code.getattr("co_flags")?.extract()?;
            let read = unsafe { layout.code_of(frame.as_ptr().cast()) };
            if read != code.as_ptr() || unsafe { layout.flags_of(read) } != flags {
                return Ok(None);
            }
        }
        Ok(Some(layout))
    }
}

/// How the hook reads a frame's code: `"struct"` (offsets confirmed at import) or `"portable"`
/// (the C API and the `co_extra` cache). Tests pin the first on every supported version.
#[pyfunction]
pub fn _code_reads() -> &'static str {
    if known().layout.is_some() {
        "struct"
    } else {
        "portable"
    }
}

/// The tag of the code a frame runs: read straight from the structs where the layout was
/// confirmed, through the C API and the `co_extra` cache elsewhere.
///
/// # Safety
/// GIL held; `frame` is a live frame object.
pub unsafe fn frame_tag(known: &Known, frame: *mut ffi::PyFrameObject) -> Tag {
    match fast_frame_tag(known, frame) {
        Some(tag) => tag,
        None => portable_frame_tag(known, frame),
    }
}

/// `frame_tag` read straight from the structs, or `None` where the layout is not confirmed.
///
/// # Safety
/// GIL held; `frame` is a live frame object.
#[inline(always)]
pub unsafe fn fast_frame_tag(known: &Known, frame: *mut ffi::PyFrameObject) -> Option<Tag> {
    let layout = known.layout?;
    let code = layout.code_of(frame);
    (ffi::Py_TYPE(code) == &raw mut ffi::PyCode_Type)
        .then(|| tag_for(known, code as usize, layout.flags_of(code).into()))
}

unsafe fn portable_frame_tag(known: &Known, frame: *mut ffi::PyFrameObject) -> Tag {
    let code = ffi::PyFrame_GetCode(frame);
    let tag = tag_of(known, code);
    ffi::Py_DECREF(code.cast());
    tag
}

#[inline(always)]
fn tag_for(known: &Known, code: usize, flags: std::ffi::c_long) -> Tag {
    let mut tag = Tag::PLAIN;
    if flags & COROUTINE_FLAGS != 0 {
        tag = tag.union(Tag::COROUTINE);
    }
    if code == known.run_forever_code {
        tag = tag.union(Tag::LOOP_RUN);
    }
    if code == known.handle_run_code {
        tag = tag.union(Tag::DISPATCH);
    }
    tag
}

/// The tag of a code object, from its `co_extra` cache or computed now.
///
/// # Safety
/// GIL held; `code` is a valid code object.
#[inline]
unsafe fn tag_of(known: &Known, code: *mut ffi::PyCodeObject) -> Tag {
    let mut cached: *mut c_void = ptr::null_mut();
    if ffi::PyUnstable_Code_GetExtra(code.cast(), known.extra_index, &raw mut cached) == 0
        && !cached.is_null()
    {
        return Tag::from_bits((cached as usize - 1) as u8);
    }
    classify(known, code)
}

#[cold]
unsafe fn classify(known: &Known, code: *mut ffi::PyCodeObject) -> Tag {
    let _saved = SavedError::take();
    let flags = ffi::PyObject_GetAttrString(code.cast(), c"co_flags".as_ptr());
    let flag_bits = if flags.is_null() {
        0
    } else {
        // Flags are never negative; -1 is `PyLong_AsLong`'s error value.
        let bits = ffi::PyLong_AsLong(flags).max(0);
        ffi::Py_DECREF(flags);
        bits
    };
    ffi::PyErr_Clear();
    let tag = tag_for(known, code as usize, flag_bits);
    // Stored as tag + 1 so that an empty slot (NULL) means "not computed yet".
    if ffi::PyUnstable_Code_SetExtra(
        code.cast(),
        known.extra_index,
        (tag.bits() as usize + 1) as *mut c_void,
    ) != 0
    {
        ffi::PyErr_Clear();
    }
    tag
}

/// Offset of `f_lasti` in `PyFrameObject` before 3.11 (from the headers), checked at import.
#[cfg(not(Py_3_11))]
const LEGACY_LASTI_OFFSET: usize = if cfg!(Py_3_10) { 96 } else { 104 };

#[cfg(not(Py_3_11))]
static LEGACY_LASTI_OK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The current instruction's byte offset before 3.11, read from the frame struct.
///
/// # Safety
/// `frame` must be a live frame object.
#[cfg(not(Py_3_11))]
#[inline]
#[allow(clippy::cast_ptr_alignment)] // the offset of an aligned `int` field
pub unsafe fn legacy_lasti_bytes(frame: *mut ffi::PyFrameObject) -> Option<i32> {
    if !LEGACY_LASTI_OK.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let raw = frame
        .cast::<u8>()
        .add(LEGACY_LASTI_OFFSET)
        .cast::<i32>()
        .read();
    // 3.10 counts instructions (two bytes each); 3.9 counts bytes.
    Some(if cfg!(Py_3_10) && raw >= 0 {
        raw * 2
    } else {
        raw
    })
}

/// Compares the struct read with `frame.f_lasti` on a live frame before trusting it.
#[cfg(not(Py_3_11))]
pub fn verify_legacy_lasti(py: Python<'_>) -> PyResult<()> {
    let frame = py.import("sys")?.call_method0("_getframe")?;
    let expected: i32 = frame.getattr("f_lasti")?.extract()?;
    LEGACY_LASTI_OK.store(true, std::sync::atomic::Ordering::Relaxed);
    let read = unsafe { legacy_lasti_bytes(frame.as_ptr().cast()) };
    LEGACY_LASTI_OK.store(read == Some(expected), std::sync::atomic::Ordering::Relaxed);
    Ok(())
}
