//! Units of event loops implemented in C (uvloop), from 3.14, for both modes. Such a loop calls
//! no Python code of its own between callbacks, so no profile or `sys.monitoring` event marks a
//! unit, and a C function it calls back makes no event at all; but it runs each callback (a task
//! step is one) inside the `contextvars.Context` it was scheduled in. A context watcher
//! (`PyContext_AddWatcher`, 3.14+) sees every switch of a thread's context; those the loop makes,
//! with no Python frame above the one it was called from, part its units
//! (`loopwatch_core::sampled::context_switch`). Two calls of a C function per callback, four
//! when uvloop runs it from its own handler; nothing else in the program is watched. Each mode
//! keeps its own `CLoops` per thread and decides what a unit means to it (`sampler::contexts`,
//! `monitor_c_loops`).

use std::cell::Cell;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use loopwatch_core::sampled::{context_switch, ContextSwitch};
use loopwatch_core::Ticks;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::threadend::{guard_thread_end, unguard_thread_end};
use crate::threadstate::{confirm_current_frame, current_interpreter_frame};

/// `PyContext.ctx_prev` and `ctx_entered` (`Include/internal/pycore_context.h`, the same from 3.7
/// to 3.15): confirmed before the watcher is first added, by entering two contexts (see
/// `layout_checks_out`).
const CTX_PREV: usize = 16;
const CTX_ENTERED: usize = 40;

/// The watcher's id while added, else -1.
static WATCHER: AtomicI32 = AtomicI32::new(-1);
/// How many watches (a thread's sampler, a thread's exact monitor) use the watcher. Changed only
/// with the GIL held.
static USERS: AtomicUsize = AtomicUsize::new(0);
/// Whether the context layout and the current-frame read were confirmed (decided once).
static TRUSTED: AtomicBool = AtomicBool::new(false);
static CHECKED: AtomicBool = AtomicBool::new(false);
const END_OF_THREAD_KEY: &std::ffi::CStr = c"loopwatch.c_loops";

thread_local! {
    /// This thread's exact-mode `ThreadMonitor` while it watches C loops (a strong reference).
    static EXACT: Cell<*mut ffi::PyObject> = const { Cell::new(std::ptr::null_mut()) };
}

/// The running unit of a C loop: the context it runs in (borrowed: the loop holds it until the
/// unit ends), the loop's own level (see `ContextSwitch::Start`), the interpreter frame the loop
/// was called from (the unit's frames are those above it), when it started, and a mark of the
/// mode's own (the exact mode: how many units its tracker had started).
pub struct ContextUnit {
    pub context: usize,
    base: usize,
    pub boundary: usize,
    pub started: Ticks,
    pub mark: u64,
}

impl ContextUnit {
    /// A unit that was running when the watch started (found from its task, not a switch).
    pub fn adopted(context: usize, base: usize, boundary: usize, started: Ticks) -> Self {
        ContextUnit {
            context,
            base,
            boundary,
            started,
            mark: 0,
        }
    }
}

/// A unit about to start: see `ContextUnit`.
pub struct Starting {
    pub context: usize,
    base: usize,
    pub boundary: usize,
}

impl Starting {
    pub fn at(self, started: Ticks, mark: u64) -> ContextUnit {
        ContextUnit {
            context: self.context,
            base: self.base,
            boundary: self.boundary,
            started,
            mark,
        }
    }
}

/// What a switch means to the thread's watch (see `ContextSwitch`); the running unit stays in
/// `CLoops::unit` for the watch to end.
pub enum Switch {
    Nothing,
    Start(Starting),
    End,
    Restart(Starting),
}

/// One watch's view of the C loop its thread runs.
#[derive(Default)]
pub struct CLoops {
    pub unit: Option<ContextUnit>,
    /// The last loop type seen running a unit, whether it is a C loop, and its name.
    loop_type: Option<(Py<PyAny>, bool, String)>,
}

impl CLoops {
    /// What the switch to `context` (None for none) means. GIL held, on the watched thread.
    ///
    /// # Safety
    /// `context` is the object the watcher was called with.
    pub unsafe fn switched(&mut self, py: Python<'_>, context: *mut ffi::PyObject) -> Switch {
        let new = if context == ffi::Py_None() {
            0
        } else {
            context as usize
        };
        let running = self.unit.as_ref().map(|unit| (unit.base, unit.boundary));
        let frame = current_interpreter_frame();
        let at_loop_level = running.is_some_and(|(_, boundary)| boundary == frame);
        let (entered, prev) = entered_from(new);
        match context_switch(
            running.map(|(base, _)| base),
            at_loop_level,
            new,
            entered,
            prev,
        ) {
            ContextSwitch::Neither => Switch::Nothing,
            ContextSwitch::Start { base } => {
                let _saved = crate::errors::SavedError::take();
                if self.runs_a_c_loop(py) {
                    Switch::Start(Starting {
                        context: new,
                        base,
                        boundary: frame,
                    })
                } else {
                    Switch::Nothing
                }
            }
            ContextSwitch::End => Switch::End,
            ContextSwitch::Restart => match running {
                Some((base, boundary)) => Switch::Restart(Starting {
                    context: new,
                    base,
                    boundary,
                }),
                None => Switch::Nothing,
            },
        }
    }

    /// Whether the calling thread runs a loop that is not asyncio's own: asked at a unit's
    /// start only, with the answer kept per loop type.
    fn runs_a_c_loop(&mut self, py: Python<'_>) -> bool {
        let Ok(running) = GET_RUNNING_LOOP
            .import(py, "asyncio.events", "_get_running_loop")
            .and_then(PyAnyMethods::call0)
        else {
            return false;
        };
        if running.is_none() {
            return false;
        }
        let kind = running.get_type();
        if let Some((known, answer, _)) = self.loop_type.as_ref() {
            if known.as_ptr() == kind.as_ptr() {
                return *answer;
            }
        }
        let answer = BASE_EVENT_LOOP
            .import(py, "asyncio.base_events", "BaseEventLoop")
            .and_then(|base| kind.is_subclass(base))
            .is_ok_and(|asyncio_own| !asyncio_own);
        let name = format!(
            "{}.{}",
            kind.module().map_or_else(|_| "?".into(), |m| m.to_string()),
            kind.qualname()
                .map_or_else(|_| "?".into(), |q| q.to_string())
        );
        self.loop_type = Some((kind.into_any().unbind(), answer, name));
        answer
    }

    /// How a unit of the loop that ran no Python frame is named: C code the loop called (its
    /// handle cannot be read from outside the loop, so the function has no name here).
    pub fn c_callback_name(&self) -> String {
        let loop_name = self
            .loop_type
            .as_ref()
            .map_or("the loop", |(_, _, name)| name.as_str());
        format!("a C function called back by {loop_name}")
    }
}

static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static BASE_EVENT_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Whether `context` (0 for none) is entered, and the context it was entered from.
///
/// # Safety
/// `context` is 0 or a live `contextvars.Context`.
#[allow(clippy::cast_ptr_alignment)] // aligned fields of the C struct
pub unsafe fn entered_from(context: usize) -> (bool, usize) {
    if context == 0 {
        return (false, 0);
    }
    let base = context as *const u8;
    let entered = base.add(CTX_ENTERED).cast::<c_int>().read() != 0;
    (entered, base.add(CTX_PREV).cast::<usize>().read())
}

/// Enters two fresh contexts and checks the fields read are what they must be.
unsafe fn layout_checks_out() -> bool {
    if cfg!(Py_GIL_DISABLED) || cfg!(Py_3_16) || !confirm_current_frame() {
        return false;
    }
    let outer = ffi::PyContext_New();
    let inner = ffi::PyContext_New();
    let mut ok = false;
    if !outer.is_null() && !inner.is_null() && ffi::PyContext_Enter(outer) == 0 {
        if ffi::PyContext_Enter(inner) == 0 {
            ok = entered_from(inner as usize) == (true, outer as usize);
            ok &= ffi::PyContext_Exit(inner) == 0 && !entered_from(inner as usize).0;
        }
        ok &= ffi::PyContext_Exit(outer) == 0;
    }
    ffi::Py_XDECREF(inner);
    ffi::Py_XDECREF(outer);
    if ffi::PyErr_Occurred().is_null() {
        ok
    } else {
        ffi::PyErr_Clear();
        false
    }
}

/// Whether units of C loops can be told here: the fields read check out (decided once, with the
/// GIL, called from Python code).
pub fn trusted(_py: Python<'_>) -> bool {
    if !CHECKED.swap(true, Ordering::Relaxed) {
        TRUSTED.store(unsafe { layout_checks_out() }, Ordering::Relaxed);
    }
    TRUSTED.load(Ordering::Relaxed)
}

/// One more watch uses the watcher: the first adds it. Where the layout cannot be trusted, or
/// every watcher slot is taken, C loops go unwatched.
pub fn add_user(py: Python<'_>) {
    USERS.fetch_add(1, Ordering::Relaxed);
    if trusted(py) && WATCHER.load(Ordering::Relaxed) < 0 {
        let id = unsafe { ffi::PyContext_AddWatcher(on_switch) };
        if id < 0 {
            unsafe { ffi::PyErr_Clear() };
        }
        WATCHER.store(id, Ordering::Relaxed);
    }
}

/// One watch less: the last clears the watcher.
pub fn remove_user() {
    let before = USERS.load(Ordering::Relaxed);
    USERS.store(before.saturating_sub(1), Ordering::Relaxed);
    if before > 1 {
        return;
    }
    let id = WATCHER.swap(-1, Ordering::Relaxed);
    if id >= 0 && unsafe { ffi::PyContext_ClearWatcher(id) } < 0 {
        unsafe { ffi::PyErr_Clear() };
    }
}

/// Whether units of C-implemented loops are seen now.
pub fn watches_c_loops() -> bool {
    WATCHER.load(Ordering::Relaxed) >= 0
}

/// The calling thread's exact-mode monitor `obj` watches C loops too, until `stop_exact`.
///
/// # Safety
/// GIL held; `obj` is the thread's live `ThreadMonitor`.
pub unsafe fn watch_exact(py: Python<'_>, obj: *mut ffi::PyObject) {
    if !EXACT.with(Cell::get).is_null() {
        return;
    }
    ffi::Py_INCREF(obj);
    EXACT.with(|exact| exact.set(obj));
    add_user(py);
    if let Err(error) = guard_thread_end(py, END_OF_THREAD_KEY, obj as usize, exact_thread_ends) {
        error.write_unraisable(py, None);
    }
}

/// The calling thread's exact-mode monitor `obj` stops watching C loops.
///
/// # Safety
/// GIL held.
pub unsafe fn stop_exact(obj: *mut ffi::PyObject) {
    if EXACT.with(Cell::get) != obj || obj.is_null() {
        return;
    }
    unguard_thread_end(END_OF_THREAD_KEY);
    release_exact();
}

unsafe fn release_exact() {
    let obj = EXACT.with(|exact| exact.replace(std::ptr::null_mut()));
    if !obj.is_null() {
        remove_user();
        ffi::Py_DECREF(obj);
    }
}

/// The thread ends with its exact monitor still watching C loops.
unsafe fn exact_thread_ends(token: usize) {
    if EXACT.with(Cell::get) as usize == token {
        release_exact();
    }
}

/// `Py_CONTEXT_SWITCHED` on any thread: the thread's context is now `context` (None for none).
unsafe extern "C" fn on_switch(_event: ffi::PyContextEvent, context: *mut ffi::PyObject) -> c_int {
    crate::sampler::on_context_switch(context);
    let exact = EXACT.with(Cell::get);
    if !exact.is_null() {
        crate::monitor_c_loops::on_context_switch(exact, context);
    }
    0
}
