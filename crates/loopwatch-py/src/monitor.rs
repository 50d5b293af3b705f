//! The per-thread monitor: installs the hook on the calling thread, seeds the frames already
//! running, and on removal reports what is pending and restores the previous profile function.

use std::cell::UnsafeCell;
use std::path::PathBuf;

use loopwatch_core::{Clock, FilterSet, Ticks, Tracker};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::codes::{frame_tag, interpreter_frame_of, known, Known};
use crate::events::{deliver, resume_position, Callee, Delivery};
use crate::hook::{chaining_profile_hook, profile_hook};
use crate::resolve::{FrameKeys, PyResolver};
use crate::threadstate::{self, ProfileSlot};
use crate::watchdog::WatchHandle;

/// Compiled include/exclude patterns (see `loopwatch` docs for the matching rule).
#[pyclass(frozen, module = "loopwatch._native")]
pub struct Filters {
    set: FilterSet,
}

impl Filters {
    pub fn set(&self) -> &FilterSet {
        &self.set
    }
}

#[pymethods]
impl Filters {
    #[new]
    #[pyo3(signature = (include=Vec::new(), exclude=Vec::new()))]
    #[allow(clippy::needless_pass_by_value)] // pyo3 hands over owned lists
    fn new(include: Vec<String>, exclude: Vec<String>) -> PyResult<Self> {
        let set =
            FilterSet::new(&include, &exclude).map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(Self { set })
    }

    /// Whether a frame with this module-qualified name, module and file may be blamed.
    #[pyo3(signature = (name, module, filename=None))]
    fn allows(&self, name: &str, module: &str, filename: Option<&str>) -> bool {
        self.set.allows(name, module, filename)
    }
}

/// What the thread had installed before us.
enum Previous {
    /// Read exactly from the thread state; `obj` is a strong reference we own.
    Slot(ProfileSlot),
    /// The layout could not be trusted: only `sys.getprofile()` is known.
    Python(Py<PyAny>),
}

pub struct State {
    pub tracker: Option<Tracker>,
    pub clock: Clock,
    pub known: &'static Known,
    sink: Option<Py<PyAny>>,
    previous: Option<Previous>,
    /// The C profile function that was there before us (a `sys.setprofile` function's
    /// trampoline, cProfile before 3.12, another tool): it gets every event after us, as if we
    /// were not there. Its object is kept alive by `previous`.
    pub chained: Option<ProfileSlot>,
    thread: u64,
    /// Set while loopwatch itself runs Python code with the hook in place (delivering outside
    /// the hook), so that this code is not mistaken for the user's.
    pub paused: bool,
    /// How this thread is seen while installed.
    backend: Backend,
    /// Why `sys.monitoring` was asked for (or would have been chosen) but not used.
    fallback: Option<String>,
    /// The thread's slot with the watchdog, which reports a stall while it runs; `None` when
    /// not installed (or every slot was taken).
    pub watch: Option<WatchHandle>,
    /// The callbacks of a C-implemented loop (uvloop) as their contexts tell them (3.14+):
    /// those that run no Python frame are seen only so (see `monitor_c_loops`).
    #[cfg(Py_3_14)]
    pub c_loops: crate::c_loops::CLoops,
}

/// The two ways of seeing a thread's calls; chosen at install, in `Backend::choose`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// `PyEval_SetProfile`: on every CPython; from 3.12 a shim over `sys.monitoring` that makes a
    /// frame object for every event.
    Legacy,
    /// `sys.monitoring` directly (3.12+): no frame objects, cheaper callbacks.
    Monitoring,
}

impl Backend {
    /// The backend asked for by `LOOPWATCH_BACKEND` (`legacy` or `monitoring`), else the best one
    /// this interpreter has. Only `sys.monitoring` being unavailable is said (as the reason).
    fn choose() -> PyResult<(Backend, Option<String>)> {
        let asked = std::env::var("LOOPWATCH_BACKEND").unwrap_or_default();
        let unavailable = Self::monitoring_unavailable();
        match (asked.as_str(), unavailable) {
            ("legacy", _) => Ok((Backend::Legacy, None)),
            ("" | "auto" | "monitoring", None) => Ok((Backend::Monitoring, None)),
            // Before 3.12 the legacy hook is the only way: nothing to say unless asked.
            ("" | "auto", Some(_)) if !cfg!(Py_3_12) => Ok((Backend::Legacy, None)),
            ("" | "auto" | "monitoring", Some(reason)) => {
                Ok((Backend::Legacy, Some(reason.to_owned())))
            }
            (other, _) => Err(PyValueError::new_err(format!(
                "LOOPWATCH_BACKEND must be 'legacy', 'monitoring' or 'auto', got '{other}'"
            ))),
        }
    }

    #[cfg_attr(not(Py_3_12), allow(clippy::unnecessary_wraps))] // the 3.12+ answer may be None
    fn monitoring_unavailable() -> Option<&'static str> {
        #[cfg(Py_3_12)]
        {
            crate::monitoring::unavailable()
        }
        #[cfg(not(Py_3_12))]
        {
            Some("sys.monitoring exists from CPython 3.12")
        }
    }

    fn frame_keys(self) -> FrameKeys {
        match self {
            Backend::Legacy => FrameKeys::Objects,
            Backend::Monitoring => FrameKeys::Interpreter,
        }
    }
}

impl State {
    /// The hook to install: the chaining one only where there is a profile function to chain to.
    fn hook(&self) -> ffi::Py_tracefunc {
        if self.chained.is_some() {
            chaining_profile_hook
        } else {
            profile_hook
        }
    }

    /// How this thread's frames are keyed by the way it is seen.
    pub fn frame_keys(&self) -> FrameKeys {
        self.backend.frame_keys()
    }

    /// Takes the finished episodes with what is needed to deliver them.
    pub fn take_delivery(&mut self) -> Option<Delivery> {
        let episodes = self.tracker.as_mut()?.take_episodes();
        if episodes.is_empty() {
            return None;
        }
        let sink = self.sink.as_ref()?;
        let py = unsafe { Python::assume_attached() };
        Some(Delivery {
            episodes,
            sink: sink.clone_ref(py),
        })
    }
}

/// One thread's hook. Touched only on the thread that installed it, with the GIL held.
#[pyclass(frozen, module = "loopwatch._native")]
pub struct ThreadMonitor {
    state: UnsafeCell<State>,
}

// SAFETY: the state is only reached from the installing thread (methods check it) under the GIL;
// the hook runs on that thread only, because profile functions are per thread.
unsafe impl Sync for ThreadMonitor {}
unsafe impl Send for ThreadMonitor {}

#[allow(clippy::useless_conversion)] // `c_ulong` is not 64 bits everywhere
pub fn current_thread() -> u64 {
    u64::from(unsafe { ffi::PyThread_get_thread_ident() })
}

/// The threshold in clock ticks, refusing what is not a positive, finite number of ms.
pub fn threshold_ticks(threshold_ms: f64) -> PyResult<Ticks> {
    if !threshold_ms.is_finite() || threshold_ms <= 0.0 {
        return Err(PyValueError::new_err(format!(
            "threshold_ms must be > 0, got {threshold_ms}"
        )));
    }
    Ok(Clock::new().ticks_for_nanos(threshold_ms * 1e6))
}

/// The calling thread's name (`threading.current_thread().name`), for stall reports.
pub fn thread_name(py: Python<'_>) -> String {
    py.import("threading")
        .and_then(|threading| threading.call_method0("current_thread"))
        .and_then(|thread| thread.getattr("name"))
        .and_then(|name| name.extract())
        .unwrap_or_else(|_| "?".to_owned())
}

impl ThreadMonitor {
    /// # Safety
    /// `obj` must be a live `ThreadMonitor`; the GIL held on its thread.
    #[inline]
    pub unsafe fn state_of(obj: *mut ffi::PyObject) -> *mut State {
        let py = Python::assume_attached();
        let monitor: &ThreadMonitor = Borrowed::from_ptr(py, obj)
            .cast_unchecked::<ThreadMonitor>()
            .get();
        monitor.state.get()
    }

    #[allow(clippy::mut_from_ref)] // interior mutability: one thread, GIL held, no overlapping borrows
    fn state(&self) -> PyResult<&mut State> {
        let state = unsafe { &mut *self.state.get() };
        if state.tracker.is_some() && state.thread != current_thread() {
            return Err(PyRuntimeError::new_err(
                "a ThreadMonitor can only be used from the thread that installed it",
            ));
        }
        Ok(state)
    }

    /// Pushes the Python frames running now, outermost first, timed from now.
    unsafe fn seed(py: Python<'_>, state: &mut State) {
        let keys = state.backend.frame_keys();
        let Some(tracker) = state.tracker.as_mut() else {
            return;
        };
        let mut frames = Vec::new();
        let mut frame = ffi::PyEval_GetFrame();
        if !frame.is_null() {
            ffi::Py_INCREF(frame.cast());
        }
        while !frame.is_null() {
            let key = match keys {
                FrameKeys::Objects => Some(frame as usize),
                FrameKeys::Interpreter => interpreter_frame_of(frame),
            };
            frames.push((
                key.unwrap_or(0) as u64,
                frame_tag(state.known, frame),
                resume_position(frame),
            ));
            let back = ffi::PyFrame_GetBack(frame);
            // Frames on the running stack stay alive while they run: the address is enough.
            ffi::Py_DECREF(frame.cast());
            frame = back;
        }
        frames.reverse();
        let now = state.clock.now();
        tracker.seed(&frames, now, &mut PyResolver::new(py, Callee::NONE, keys));
        // A monitor started inside a step: the watchdog times the rest of it from now, as the
        // always-on mode does (the hot path that may come next never tells it).
        if let Some(watch) = state.watch.as_mut() {
            watch.publish(tracker.unit_started_at());
        }
    }

    /// Whether our hook is still the thread's profile function (or its `sys.monitoring`
    /// registration still ours).
    fn is_current_hook(py: Python<'_>, me: *mut ffi::PyObject) -> bool {
        #[cfg(Py_3_12)]
        if unsafe { &*Self::state_of(me) }.backend == Backend::Monitoring {
            return crate::monitoring::is_attached(me);
        }
        match unsafe { threadstate::current() } {
            Some(slot) => slot.obj == me,
            None => py
                .import("sys")
                .and_then(|sys| sys.call_method0("getprofile"))
                .is_ok_and(|current| current.as_ptr() == me),
        }
    }

    /// Watches the thread through `sys.monitoring`. Gives the tracker back (afresh) when no tool
    /// id is free, for the legacy hook to use instead.
    #[cfg(Py_3_12)]
    fn install_monitoring(
        py: Python<'_>,
        me: *mut ffi::PyObject,
        state: &mut State,
        tracker: Tracker,
        sink: &Py<PyAny>,
    ) -> PyResult<Option<Tracker>> {
        state.backend = Backend::Monitoring;
        state.previous = None;
        state.chained = None;
        state.thread = current_thread();
        state.sink = Some(sink.clone_ref(py));
        state.tracker = Some(tracker);
        let attached = unsafe {
            Self::seed(py, state);
            crate::monitoring::attach(py, me)
        };
        if attached.as_ref().is_ok_and(|&yes| yes) {
            return Ok(None);
        }
        let mut tracker = state.tracker.take().expect("installed just now");
        state.sink = None;
        attached?;
        tracker.reset();
        state.fallback = Some(crate::monitoring::NO_FREE_TOOL_ID.to_owned());
        Ok(Some(tracker))
    }

    #[cfg(not(Py_3_12))]
    #[allow(clippy::unnecessary_wraps)] // the signature of the 3.12+ version
    fn install_monitoring(
        _py: Python<'_>,
        _me: *mut ffi::PyObject,
        _state: &mut State,
        tracker: Tracker,
        _sink: &Py<PyAny>,
    ) -> PyResult<Option<Tracker>> {
        Ok(Some(tracker))
    }

    /// Reports what the running unit has blocked so far (to the current sink).
    fn flush_and_deliver(&self, me: *mut ffi::PyObject) -> PyResult<()> {
        let delivery = {
            let state = self.state()?;
            let py = unsafe { Python::assume_attached() };
            let Some(tracker) = state.tracker.as_mut() else {
                return Ok(());
            };
            let now = state.clock.now();
            let keys = state.backend.frame_keys();
            tracker.flush(now, &mut PyResolver::new(py, Callee::NONE, keys));
            if let Some(watch) = state.watch.as_mut() {
                watch.publish(tracker.unit_started_at());
            }
            state.take_delivery()
        };
        if let Some(delivery) = delivery {
            let state = self.state.get();
            unsafe {
                let was_paused = std::mem::replace(&mut (*state).paused, true);
                deliver(me, delivery);
                (*state).paused = was_paused;
            }
        }
        Ok(())
    }
}

#[pymethods]
impl ThreadMonitor {
    #[new]
    fn new() -> Self {
        Self {
            state: UnsafeCell::new(State {
                tracker: None,
                clock: Clock::new(),
                known: known(),
                sink: None,
                previous: None,
                chained: None,
                thread: 0,
                paused: false,
                backend: Backend::Legacy,
                fallback: None,
                watch: None,
                #[cfg(Py_3_14)]
                c_loops: crate::c_loops::CLoops::default(),
            }),
        }
    }

    /// Installs the hook on the calling thread. `sink` receives one dict per episode.
    /// `stall_reports`: the watchdog reports a step still running past the threshold, to stderr.
    /// `stall_recordings`: recordings that get a record of each such report; `stall_callbacks`:
    /// whether they also go to `_take_stalls` for Python callbacks.
    #[pyo3(signature = (
        threshold_ms, filters, sink, stall_reports=true, stall_recordings=Vec::new(),
        stall_callbacks=false
    ))]
    #[allow(clippy::too_many_arguments)] // the settings of one monitor, as Python passes them
    fn install(
        slf: &Bound<'_, Self>,
        threshold_ms: f64,
        filters: &Filters,
        sink: Py<PyAny>,
        stall_reports: bool,
        stall_recordings: Vec<PathBuf>,
        stall_callbacks: bool,
    ) -> PyResult<()> {
        let py = slf.py();
        let me = slf.as_ptr();
        let state = unsafe { &mut *slf.get().state.get() };
        if state.tracker.is_some() {
            return Err(PyRuntimeError::new_err(
                "this ThreadMonitor is already installed",
            ));
        }
        let clock = Clock::new();
        let threshold = threshold_ticks(threshold_ms)?;
        let tracker = Tracker::new(threshold, clock.nanos_per_tick(), filters.set.clone());
        let (backend, fallback) = Backend::choose()?;
        crate::gil::learn(py);
        state.watch = WatchHandle::register(
            crate::stackread::current_thread_state(),
            current_thread(),
            &thread_name(py),
            threshold,
            stall_reports,
            false,
        );
        if let Some(watch) = state.watch.as_ref() {
            watch.set_destinations(stall_recordings, stall_callbacks);
        }
        state.fallback = fallback;
        let tracker = match backend {
            Backend::Monitoring => {
                let Some(tracker) = Self::install_monitoring(py, me, state, tracker, &sink)? else {
                    #[cfg(Py_3_14)]
                    unsafe {
                        crate::c_loops::watch_exact(py, me);
                    }
                    return Ok(());
                };
                tracker
            }
            Backend::Legacy => tracker,
        };
        state.backend = Backend::Legacy;
        // Trust the thread-state read only where it agrees with what sys.getprofile() reports.
        let from_sys = py.import("sys")?.call_method0("getprofile")?;
        let previous = match unsafe { threadstate::current() } {
            Some(slot)
                if slot.obj == from_sys.as_ptr() || (slot.obj.is_null() && from_sys.is_none()) =>
            {
                unsafe { ffi::Py_XINCREF(slot.obj) };
                Previous::Slot(slot)
            }
            _ => Previous::Python(from_sys.unbind()),
        };
        state.chained = match &previous {
            Previous::Slot(slot) if slot.func.is_some() => Some(*slot),
            _ => None,
        };
        state.previous = Some(previous);
        state.thread = current_thread();
        state.sink = Some(sink);
        state.tracker = Some(tracker);
        unsafe {
            Self::seed(py, state);
            let hook = state.hook();
            ffi::PyEval_SetProfile(Some(hook), me);
            let installed = ProfileSlot {
                func: Some(hook),
                obj: me,
            };
            if !threadstate::verify(installed) {
                // The function pointer cannot be trusted on this build: keep only the object
                // (a `Previous::Python` found by `sys.getprofile()` stays as it is).
                if let Some(Previous::Slot(slot)) = state.previous {
                    state.chained = None;
                    state.previous = Some(Previous::Python(
                        Bound::from_owned_ptr_or_opt(py, slot.obj)
                            .map_or_else(|| py.None(), Bound::unbind),
                    ));
                }
            }
            #[cfg(Py_3_14)]
            crate::c_loops::watch_exact(py, me);
        }
        Ok(())
    }

    /// The profile function that was on this thread before, if loopwatch cannot pass it the
    /// events while installed (only where the thread state cannot be read): it is paused, and
    /// restored by `uninstall`. None when there was none, or when it gets every event.
    #[getter]
    fn paused_profiler(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        let state = unsafe { &*self.state.get() };
        match &state.previous {
            Some(Previous::Python(function)) if !function.is_none(py) => {
                Some(function.clone_ref(py))
            }
            _ => None,
        }
    }

    /// Applies new settings. What the running step blocked so far goes to the old sink first,
    /// and the step is judged afresh from now under the new settings.
    #[pyo3(signature = (
        threshold_ms, filters, sink, stall_reports=true, stall_recordings=Vec::new(),
        stall_callbacks=false
    ))]
    #[allow(clippy::too_many_arguments)] // as `install`
    fn reconfigure(
        slf: &Bound<'_, Self>,
        threshold_ms: f64,
        filters: &Filters,
        sink: Py<PyAny>,
        stall_reports: bool,
        stall_recordings: Vec<PathBuf>,
        stall_callbacks: bool,
    ) -> PyResult<()> {
        let this = slf.get();
        let threshold = threshold_ticks(threshold_ms)?;
        if this.state()?.tracker.is_none() {
            return Err(PyRuntimeError::new_err(
                "this ThreadMonitor is not installed",
            ));
        }
        this.flush_and_deliver(slf.as_ptr())?;
        let state = this.state()?;
        // The old sink may have uninstalled us meanwhile; then there is nothing to configure.
        if let Some(tracker) = state.tracker.as_mut() {
            tracker.configure(threshold, filters.set.clone());
            state.sink = Some(sink);
            if let Some(watch) = state.watch.as_ref() {
                watch.configure(threshold, stall_reports);
                watch.set_destinations(stall_recordings, stall_callbacks);
            }
        }
        Ok(())
    }

    /// Removes the hook: reports what is pending and restores the previous profile function.
    /// Returns False (and leaves the profiler alone) if something else replaced our hook.
    fn uninstall(slf: &Bound<'_, Self>) -> PyResult<bool> {
        let py = slf.py();
        let this = slf.get();
        let me = slf.as_ptr();
        if this.state()?.tracker.is_none() {
            return Ok(false);
        }
        let ours = Self::is_current_hook(py, me);
        if ours {
            this.flush_and_deliver(me)?;
        }
        let state = this.state()?;
        if state.tracker.is_none() {
            // The sink uninstalled us while receiving the last reports: already done.
            return Ok(ours);
        }
        state.tracker = None;
        state.sink = None;
        state.chained = None;
        state.watch = None;
        #[cfg(Py_3_14)]
        unsafe {
            state.c_loops.unit = None;
            crate::c_loops::stop_exact(me);
        }
        #[cfg(Py_3_12)]
        if state.backend == Backend::Monitoring {
            unsafe { crate::monitoring::detach(py, me)? };
            return Ok(ours);
        }
        let previous = state.previous.take();
        if ours {
            match previous {
                Some(Previous::Slot(slot)) => unsafe {
                    ffi::PyEval_SetProfile(slot.func, slot.obj);
                    ffi::Py_XDECREF(slot.obj);
                },
                Some(Previous::Python(function)) if !function.is_none(py) => {
                    py.import("sys")?.call_method1("setprofile", (function,))?;
                }
                _ => unsafe { ffi::PyEval_SetProfile(None, std::ptr::null_mut()) },
            }
        } else if let Some(Previous::Slot(slot)) = previous {
            unsafe { ffi::Py_XDECREF(slot.obj) };
        }
        Ok(ours)
    }

    /// Reports now what the running step has blocked so far, as if it ended here; the step goes
    /// on, judged afresh from now. For a reader who must see every episode up to this point.
    fn flush(slf: &Bound<'_, Self>) -> PyResult<()> {
        let this = slf.get();
        if this.state()?.tracker.is_none() || !Self::is_current_hook(slf.py(), slf.as_ptr()) {
            return Ok(());
        }
        this.flush_and_deliver(slf.as_ptr())
    }

    /// In the child of a `fork()` made on this thread: forgets what the parent had seen, so that
    /// the child reports only what it blocks itself, from now on.
    fn after_fork(&self) -> PyResult<()> {
        let state = self.state()?;
        if let Some(tracker) = state.tracker.as_mut() {
            tracker.forget_the_parent();
        }
        #[cfg(Py_3_14)]
        {
            state.c_loops.unit = None;
        }
        if let Some(watch) = state.watch.as_mut() {
            watch.after_fork_in_child();
        }
        Ok(())
    }

    /// Ignores (True) or watches again (False) what this thread runs, and returns the previous
    /// setting. For loopwatch's own work with the hook in place: the reports' callbacks.
    fn set_paused(&self, paused: bool) -> PyResult<bool> {
        let state = self.state()?;
        if let (Some(watch), Some(tracker)) = (state.watch.as_mut(), state.tracker.as_ref()) {
            // loopwatch's own work is no stall of the program's: the watchdog does not time it.
            watch.publish(if paused {
                None
            } else {
                tracker.unit_started_at()
            });
        }
        Ok(std::mem::replace(&mut state.paused, paused))
    }

    /// How this thread is watched while installed: "monitoring" (`sys.monitoring`, 3.12+) or
    /// "legacy" (the profile hook).
    #[getter]
    fn backend(&self) -> &'static str {
        match unsafe { &*self.state.get() }.backend {
            Backend::Legacy => "legacy",
            Backend::Monitoring => "monitoring",
        }
    }

    /// Why the last install did not use `sys.monitoring` where it would have, if so.
    #[getter]
    fn fallback(&self) -> Option<String> {
        unsafe { &*self.state.get() }.fallback.clone()
    }

    /// True while installed (even if another profiler has since replaced the hook).
    #[getter]
    fn installed(&self) -> bool {
        unsafe { &*self.state.get() }.tracker.is_some()
    }

    /// Whether the hook is installed and still the thread's profile function.
    #[getter]
    fn hooked(slf: &Bound<'_, Self>) -> bool {
        slf.get().installed() && Self::is_current_hook(slf.py(), slf.as_ptr())
    }

    /// Called only when code saved `sys.getprofile()` and restored it with `sys.setprofile()`,
    /// which wraps this object in a Python-level trampoline. Take the C hook back and re-seed,
    /// since events were missed meanwhile.
    fn __call__(
        slf: &Bound<'_, Self>,
        _frame: &Bound<'_, PyAny>,
        _event: &Bound<'_, PyAny>,
        _arg: &Bound<'_, PyAny>,
    ) {
        let py = slf.py();
        let state = unsafe { &mut *slf.get().state.get() };
        if state.tracker.is_none()
            || state.thread != current_thread()
            || state.backend == Backend::Monitoring
        {
            return;
        }
        if let Some(tracker) = state.tracker.as_mut() {
            tracker.reset();
        }
        unsafe {
            Self::seed(py, state);
            ffi::PyEval_SetProfile(Some(state.hook()), slf.as_ptr());
        }
    }
}

/// How loopwatch watches the calling thread now: "monitoring", "legacy", or None (not watched).
/// For tests and diagnostics: `sys.getprofile()` says nothing of `sys.monitoring`.
#[pyfunction]
pub fn _watched(py: Python<'_>) -> PyResult<Option<&'static str>> {
    #[cfg(Py_3_12)]
    if crate::monitoring::watched_here() {
        return Ok(Some("monitoring"));
    }
    let ours = |func: ffi::Py_tracefunc| {
        let func = func as usize;
        func == profile_hook as *const () as usize
            || func == chaining_profile_hook as *const () as usize
    };
    let legacy = match unsafe { threadstate::current() } {
        Some(slot) => slot.func.is_some_and(ours),
        None => py
            .import("sys")?
            .call_method0("getprofile")?
            .is_instance_of::<ThreadMonitor>(),
    };
    Ok(legacy.then_some("legacy"))
}
