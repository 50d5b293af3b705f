//! The always-on mode: no profile hook. Each unit (a callback; a task step is one) of asyncio's
//! loops is timed on the loop's thread at `Handle._run`'s start and end, for a few tens of ns:
//! from 3.12 by `sys.monitoring` local events on two code objects, `Handle._run` (start, return)
//! and `BaseEventLoop._run_once` (start); on 3.11, by a callable of loopwatch's own put in
//! `Handle._run`'s place that calls it (see `legacy`). Not before 3.11: a C call is named from
//! the columns of its call site, which code objects keep from 3.11. The watchdog reads the thread's stack once
//! a unit has run half the threshold, and a unit that ends over the threshold is blamed from the
//! last stack it read (see `loopwatch_core::sampled`). Loops implemented in C (uvloop) run no
//! Python code between units: from 3.14 their units are told by the contexts they run in (see
//! `contexts`).

use std::cell::{Cell, UnsafeCell};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use loopwatch_core::cpu_wait::thread_cpu_wait_ns;
use loopwatch_core::gc::thread_gc_within;
use loopwatch_core::sampled::{
    is_unit_boundary, sampled_episode, unit_frames, FrameName, SampledUnit,
};
use loopwatch_core::{Clock, SampledFrame, Ticks};
use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::errors::{attached, SavedError};
use crate::monitor::{current_thread, thread_name, threshold_ticks, Filters};
#[cfg(Py_3_12)]
use crate::monitoring::{
    holds_tool_id, register_callbacks, unregister_callbacks_and_free, use_free_tool_id,
};
use crate::report::episode_to_python;
use crate::stackread::{frame_from_tuple, frame_to_tuple, FrameTuple};
#[cfg(Py_3_12)]
use crate::threadend::none;
use crate::threadend::{guard_thread_end, unguard_thread_end, UnderTheGil};
use crate::watchdog::WatchHandle;

#[cfg(Py_3_12)]
const TOOL_NAME: &str = "loopwatch-sampler";
const END_OF_THREAD_KEY: &std::ffi::CStr = c"loopwatch.sampler";

thread_local! {
    /// This thread's `ThreadSampler` while installed (a strong reference), else null.
    static SAMPLER: Cell<*mut ffi::PyObject> = const { Cell::new(std::ptr::null_mut()) };
}

/// `asyncio.events.Handle._run`'s code object while the tool is registered: its start begins a
/// unit; any other start the tool sees is `_run_once`'s.
static HANDLE_RUN: AtomicUsize = AtomicUsize::new(0);

/// The interpreter-wide registration: the tool id held, the code objects instrumented, and how
/// many threads use it. Touched only with the GIL held.
#[cfg(Py_3_12)]
struct Registration {
    tool: u8,
    codes: Vec<Py<PyAny>>,
    threads: usize,
}

/// The interpreter-wide registration on 3.11: the function `Handle._run` was, and how many
/// threads use loopwatch's callable in its place.
#[cfg(not(Py_3_12))]
struct Registration {
    original: Py<PyAny>,
    threads: usize,
}

static REGISTRATION: UnderTheGil<Option<Registration>> = UnderTheGil(UnsafeCell::new(None));

struct State {
    installed: bool,
    thread: u64,
    clock: Clock,
    threshold: Ticks,
    filters: Option<loopwatch_core::FilterSet>,
    sink: Option<Py<PyAny>>,
    watch: Option<WatchHandle>,
    /// When the running unit started (less what loopwatch's own work in it took).
    unit: Option<Ticks>,
    /// Since when loopwatch's own work (the reports' callbacks) has run, if it runs now.
    paused_since: Option<Ticks>,
    /// On 3.11, the handle of the unit the watch started in: its end is not seen (it was
    /// called before loopwatch's callable was in place), so the next unit's start ends it.
    #[cfg(not(Py_3_12))]
    end_unseen: bool,
    #[cfg(not(Py_3_12))]
    open_handle: Option<Py<PyAny>>,
    /// The running unit of a C-implemented loop, if that is what runs (see `contexts`).
    #[cfg(Py_3_14)]
    contexts: crate::c_loops::CLoops,
}

impl State {
    /// No unit runs from now on, whatever the way it was told (uninstalled, forked, thread gone).
    fn forget_running_unit(&mut self) {
        self.unit = None;
        #[cfg(not(Py_3_12))]
        {
            self.end_unseen = false;
            self.open_handle = None;
        }
        #[cfg(Py_3_14)]
        {
            self.contexts.unit = None;
        }
    }
}

/// One thread's always-on watch. Touched only on the thread that installed it, with the GIL.
#[pyclass(frozen, module = "loopwatch._native")]
pub struct ThreadSampler {
    state: UnsafeCell<State>,
}

// SAFETY: as `ThreadMonitor`: the state is only reached from the installing thread, under the GIL.
unsafe impl Sync for ThreadSampler {}
unsafe impl Send for ThreadSampler {}

impl ThreadSampler {
    unsafe fn state_of(obj: *mut ffi::PyObject) -> *mut State {
        let py = Python::assume_attached();
        Borrowed::from_ptr(py, obj)
            .cast_unchecked::<ThreadSampler>()
            .get()
            .state
            .get()
    }

    #[allow(clippy::mut_from_ref)] // one thread, GIL held, no overlapping borrows
    fn state(&self) -> PyResult<&mut State> {
        let state = unsafe { &mut *self.state.get() };
        if state.installed && state.thread != current_thread() {
            return Err(PyRuntimeError::new_err(
                "a ThreadSampler can only be used from the thread that installed it",
            ));
        }
        Ok(state)
    }
}

#[pymethods]
impl ThreadSampler {
    #[new]
    fn new() -> Self {
        Self {
            state: UnsafeCell::new(State {
                installed: false,
                thread: 0,
                clock: Clock::new(),
                threshold: Ticks::MAX,
                filters: None,
                sink: None,
                watch: None,
                unit: None,
                paused_since: None,
                #[cfg(not(Py_3_12))]
                end_unseen: false,
                #[cfg(not(Py_3_12))]
                open_handle: None,
                #[cfg(Py_3_14)]
                contexts: crate::c_loops::CLoops::default(),
            }),
        }
    }

    /// Starts watching the calling thread's asyncio loop; `sink` receives one dict per episode.
    /// The other arguments are `ThreadMonitor.install`'s.
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
        if state.installed {
            return Err(PyRuntimeError::new_err(
                "this ThreadSampler is already installed",
            ));
        }
        if let Some(reason) = crate::stackread::unavailable() {
            return Err(PyRuntimeError::new_err(format!(
                "the always-on mode reads the loop thread's stack, which it cannot do here: {reason}"
            )));
        }
        if !SAMPLER.with(Cell::get).is_null() {
            return Err(PyRuntimeError::new_err(
                "this thread is already watched in the always-on mode",
            ));
        }
        let threshold = threshold_ticks(threshold_ms)?;
        register(py)?;
        crate::gil::learn(py);
        state.watch = WatchHandle::register(
            crate::stackread::current_thread_state(),
            current_thread(),
            &thread_name(py),
            threshold,
            stall_reports,
            true,
        );
        let Some(watch) = state.watch.as_mut() else {
            unregister(py)?;
            return Err(PyRuntimeError::new_err(
                "every watchdog slot is taken: too many threads are watched at once",
            ));
        };
        watch.set_destinations(stall_recordings, stall_callbacks);
        state.threshold = threshold;
        state.filters = Some(filters.set().clone());
        state.sink = Some(sink);
        state.thread = current_thread();
        state.paused_since = None;
        state.installed = true;
        // Installed from inside a unit (a task step that enters a monitor): timed from now, as
        // the exact mode times the frames it finds running.
        state.unit = unsafe { inside_a_unit() }.then(|| state.clock.now());
        #[cfg(not(Py_3_12))]
        if state.unit.is_some() {
            legacy::end_this_unit_soon(py, state)?;
        }
        if let Some(watch) = state.watch.as_mut() {
            watch.publish(state.unit);
        }
        #[cfg(Py_3_14)]
        if state.unit.is_none() {
            // Never the program's fault: the step is then timed from the next unit on.
            if let Err(error) = contexts::adopt_running_unit(py, state) {
                error.write_unraisable(py, None);
            }
        }
        unsafe {
            ffi::Py_INCREF(me);
            SAMPLER.with(|s| s.set(me));
            guard_thread_end(py, END_OF_THREAD_KEY, me as usize, end_of_thread)?;
        }
        Ok(())
    }

    /// Applies new settings; the running unit goes on under them.
    #[pyo3(signature = (
        threshold_ms, filters, sink, stall_reports=true, stall_recordings=Vec::new(),
        stall_callbacks=false
    ))]
    #[allow(clippy::too_many_arguments)] // as `install`
    fn reconfigure(
        &self,
        threshold_ms: f64,
        filters: &Filters,
        sink: Py<PyAny>,
        stall_reports: bool,
        stall_recordings: Vec<PathBuf>,
        stall_callbacks: bool,
    ) -> PyResult<()> {
        let state = self.state()?;
        if !state.installed {
            return Err(PyRuntimeError::new_err(
                "this ThreadSampler is not installed",
            ));
        }
        let threshold = threshold_ticks(threshold_ms)?;
        state.threshold = threshold;
        state.filters = Some(filters.set().clone());
        state.sink = Some(sink);
        if let Some(watch) = state.watch.as_ref() {
            watch.configure(threshold, stall_reports);
            watch.set_destinations(stall_recordings, stall_callbacks);
        }
        Ok(())
    }

    /// Stops watching the thread, after reporting what the running unit (the one that
    /// uninstalls) has blocked so far if that crossed the threshold. Returns whether it was
    /// installed.
    fn uninstall(slf: &Bound<'_, Self>) -> PyResult<bool> {
        let py = slf.py();
        let me = slf.as_ptr();
        let state = slf.get().state()?;
        if !state.installed {
            return Ok(false);
        }
        unsafe { report_running_unit(me, state, false) };
        if !state.installed {
            return Ok(true); // the sink uninstalled us while receiving that report
        }
        state.installed = false;
        state.watch = None;
        state.sink = None;
        state.forget_running_unit();
        let mine = SAMPLER.with(|s| {
            if s.get() == me {
                s.set(std::ptr::null_mut());
                true
            } else {
                false
            }
        });
        if mine {
            unsafe {
                unguard_thread_end(END_OF_THREAD_KEY);
                ffi::Py_DECREF(me);
            }
        }
        unregister(py)?;
        Ok(true)
    }

    /// Reports now what the running unit has blocked so far, if that crossed the threshold, as
    /// if it ended here; the unit goes on, timed afresh from now.
    fn flush(slf: &Bound<'_, Self>) -> PyResult<()> {
        let state = slf.get().state()?;
        if state.installed {
            unsafe { report_running_unit(slf.as_ptr(), state, true) };
        }
        Ok(())
    }

    /// In the child of a `fork()` made on this thread: the parent's running unit is not the
    /// child's.
    fn after_fork(&self) -> PyResult<()> {
        let state = self.state()?;
        state.forget_running_unit();
        state.paused_since = None;
        if let Some(watch) = state.watch.as_mut() {
            watch.after_fork_in_child();
        }
        Ok(())
    }

    /// Leaves out (True) or counts again (False) what this thread runs: loopwatch's own work in
    /// a unit (the reports' callbacks) is no part of the program's. Returns the previous setting.
    fn set_paused(&self, paused: bool) -> PyResult<bool> {
        let state = self.state()?;
        let was = state.paused_since.is_some();
        if paused == was {
            return Ok(was);
        }
        let now = state.clock.now();
        if paused {
            state.paused_since = Some(now);
            if let Some(watch) = state.watch.as_mut() {
                watch.publish(None);
            }
        } else if let Some(since) = state.paused_since.take() {
            if let Some(started) = state.unit.as_mut() {
                *started = started.saturating_add(now.saturating_sub(since)).min(now);
                if let Some(watch) = state.watch.as_mut() {
                    watch.publish(Some(*started));
                }
            }
        }
        Ok(was)
    }

    #[getter]
    #[allow(clippy::unused_self)] // a property of the Python object, as `ThreadMonitor`'s
    fn backend(&self) -> &'static str {
        "sampling"
    }

    #[getter]
    #[allow(clippy::unused_self)] // as `backend`
    fn fallback(&self) -> Option<String> {
        None
    }

    #[getter]
    fn installed(&self) -> bool {
        unsafe { &*self.state.get() }.installed
    }

    /// Whether loops implemented in C (uvloop) are watched too: from 3.14, where the context
    /// watcher's reads check out (see `contexts`).
    #[staticmethod]
    fn sees_c_loops(py: Python<'_>) -> bool {
        #[cfg(Py_3_14)]
        return crate::c_loops::trusted(py);
        #[cfg(not(Py_3_14))]
        {
            let _ = py;
            false
        }
    }

    /// As `installed`: nothing the program does takes the sampler's place.
    #[getter]
    fn hooked(&self) -> bool {
        self.installed()
    }

    #[getter]
    #[allow(clippy::unused_self)] // as `backend`
    fn paused_profiler(&self) -> Option<Py<PyAny>> {
        None
    }
}

/// The running `Handle._run`'s frame on the calling thread's stack (a new reference), or null.
unsafe fn running_handle_run() -> *mut ffi::PyFrameObject {
    let handle_run = HANDLE_RUN.load(Ordering::Relaxed);
    let mut frame = ffi::PyEval_GetFrame();
    if !frame.is_null() {
        ffi::Py_INCREF(frame.cast());
    }
    while !frame.is_null() {
        let code = ffi::PyFrame_GetCode(frame);
        let found = code as usize == handle_run;
        ffi::Py_DECREF(code.cast());
        if found {
            return frame;
        }
        let back = ffi::PyFrame_GetBack(frame);
        ffi::Py_DECREF(frame.cast());
        frame = back;
    }
    std::ptr::null_mut()
}

/// Whether `Handle._run` is on the calling thread's stack.
unsafe fn inside_a_unit() -> bool {
    let frame = running_handle_run();
    if frame.is_null() {
        return false;
    }
    ffi::Py_DECREF(frame.cast());
    true
}

/// The thread ends while its sampler is installed: its share of the tool id goes back.
unsafe fn end_of_thread(token: usize) {
    let obj = SAMPLER.with(|s| {
        if s.get() as usize == token {
            s.replace(std::ptr::null_mut())
        } else {
            std::ptr::null_mut()
        }
    });
    if obj.is_null() {
        return;
    }
    let py = Python::assume_attached();
    let _saved = SavedError::take();
    let state = &mut *ThreadSampler::state_of(obj);
    state.installed = false;
    state.watch = None; // the thread state is about to go: no more reads of it
    state.sink = None;
    state.forget_running_unit();
    if let Err(error) = unregister(py) {
        error.write_unraisable(py, None);
    }
    ffi::Py_DECREF(obj);
}

/// The events, by their names in `sys.monitoring.events`, with their callbacks.
#[cfg(Py_3_12)]
const EVENTS: [(&str, ffi::vectorcallfunc); 2] = [("PY_START", on_start), ("PY_RETURN", on_return)];

/// One more thread uses the tool: the first takes a tool id and instruments the code objects.
#[cfg(Py_3_12)]
fn register(py: Python<'_>) -> PyResult<()> {
    let registration = unsafe { &mut *REGISTRATION.0.get() };
    if let Some(found) = registration.as_mut() {
        found.threads += 1;
        return Ok(());
    }
    let Some(tool) = use_free_tool_id(py, TOOL_NAME)? else {
        return Err(PyRuntimeError::new_err(format!(
            "the always-on mode needs a sys.monitoring tool id: {}",
            crate::monitoring::NO_FREE_TOOL_ID
        )));
    };
    let outcome = (|| -> PyResult<Vec<Py<PyAny>>> {
        register_callbacks(py, tool, &EVENTS)?;
        let monitoring = py.import("sys")?.getattr("monitoring")?;
        let events = monitoring.getattr("events")?;
        let start: u64 = events.getattr("PY_START")?.extract()?;
        let ret: u64 = events.getattr("PY_RETURN")?.extract()?;
        let handle_run = py
            .import("asyncio.events")?
            .getattr("Handle")?
            .getattr("_run")?
            .getattr("__code__")?;
        let run_once = py
            .import("asyncio.base_events")?
            .getattr("BaseEventLoop")?
            .getattr("_run_once")?
            .getattr("__code__")?;
        HANDLE_RUN.store(handle_run.as_ptr() as usize, Ordering::Relaxed);
        monitoring.call_method1("set_local_events", (tool, &handle_run, start | ret))?;
        monitoring.call_method1("set_local_events", (tool, &run_once, start))?;
        Ok(vec![handle_run.unbind(), run_once.unbind()])
    })();
    match outcome {
        Ok(codes) => {
            *registration = Some(Registration {
                tool,
                codes,
                threads: 1,
            });
            #[cfg(Py_3_14)]
            crate::c_loops::add_user(py);
            Ok(())
        }
        Err(error) => {
            let _ = release(py, tool, &[]);
            Err(error)
        }
    }
}

/// One thread less: the registration, taken, if it was the last.
fn last_thread_leaves() -> Option<Registration> {
    let registration = unsafe { &mut *REGISTRATION.0.get() };
    let found = registration.as_mut()?;
    found.threads -= 1;
    registration.take_if(|found| found.threads == 0)
}

/// One thread less; the last gives the tool id back.
#[cfg(Py_3_12)]
fn unregister(py: Python<'_>) -> PyResult<()> {
    match last_thread_leaves() {
        Some(ended) => {
            #[cfg(Py_3_14)]
            crate::c_loops::remove_user();
            release(py, ended.tool, &ended.codes)
        }
        None => Ok(()),
    }
}

#[cfg(Py_3_12)]
fn release(py: Python<'_>, tool: u8, codes: &[Py<PyAny>]) -> PyResult<()> {
    HANDLE_RUN.store(0, Ordering::Relaxed);
    if !holds_tool_id(py, tool, TOOL_NAME)? {
        return Ok(());
    }
    let monitoring = py.import("sys")?.getattr("monitoring")?;
    for code in codes {
        monitoring.call_method1("set_local_events", (tool, code, 0))?;
    }
    unregister_callbacks_and_free(py, tool, &EVENTS)
}

// --- the callbacks: on every callback of every asyncio loop in the process -------------------

#[inline(always)]
fn sampling() -> Option<*mut ffi::PyObject> {
    let obj = SAMPLER.with(Cell::get);
    (!obj.is_null()).then_some(obj)
}

/// `PY_START` (code, offset): `Handle._run` starts a unit; `_run_once` starting means no unit
/// runs (one whose return was not seen, an exception the loop let through, is over).
#[cfg(Py_3_12)]
unsafe extern "C" fn on_start(
    _callback: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    _nargsf: usize,
    _names: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    if let Some(obj) = sampling() {
        let state = &mut *ThreadSampler::state_of(obj);
        if state.installed {
            let started = if *args as usize == HANDLE_RUN.load(Ordering::Relaxed) {
                Some(state.clock.now())
            } else {
                None
            };
            state.unit = started;
            if let Some(watch) = state.watch.as_mut() {
                watch.set_boundary(0);
                watch.publish(started);
            }
        }
    }
    none()
}

/// `PY_RETURN` (code, offset, value) of `Handle._run`: the unit ends.
#[cfg(Py_3_12)]
unsafe extern "C" fn on_return(
    _callback: *mut ffi::PyObject,
    _args: *const *mut ffi::PyObject,
    _nargsf: usize,
    _names: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    if let Some(obj) = sampling() {
        let state = &mut *ThreadSampler::state_of(obj);
        if let (true, Some(started)) = (state.installed, state.unit.take()) {
            let now = state.clock.now();
            let ran = now.saturating_sub(started);
            if ran < state.threshold {
                if let Some(watch) = state.watch.as_mut() {
                    watch.publish(None);
                }
            } else {
                // `Handle._run` is still the running frame: its `self` names the callback.
                let handle_frame = ffi::PyEval_GetFrame().cast::<ffi::PyObject>();
                attached(|| unit_over_threshold(obj, state, (started, now), handle_frame));
            }
        }
    }
    none()
}

/// Outside the events (a flush, an uninstall): the running unit, if it has crossed the threshold,
/// is reported as if it ended now; with `restart` it goes on, timed from now.
unsafe fn report_running_unit(obj: *mut ffi::PyObject, state: &mut State, restart: bool) {
    let Some(started) = state.unit.take() else {
        return;
    };
    let now = state.clock.now();
    let ran = now.saturating_sub(started);
    if ran >= state.threshold {
        unit_over_threshold(obj, state, (started, now), std::ptr::null_mut());
    } else if let Some(watch) = state.watch.as_mut() {
        watch.publish(None);
    }
    if restart && state.installed {
        state.unit = Some(now);
        if let Some(watch) = state.watch.as_mut() {
            watch.publish(Some(now));
        }
    }
}

/// The slow path: a unit ended over the threshold. Blames it from the watchdog's last stack
/// and hands the episode to the sink. `handle`: the handle that ran, or the running
/// `Handle._run`'s frame, if the unit ends with it (else null). Never raises into the program.
unsafe fn unit_over_threshold(
    obj: *mut ffi::PyObject,
    state: &mut State,
    (started, now): (Ticks, Ticks),
    handle: *mut ffi::PyObject,
) {
    let ran = now.saturating_sub(started);
    let py = Python::assume_attached();
    let _saved = SavedError::take();
    let (sample, reported) = match state.watch.as_mut() {
        Some(watch) => {
            let sample = watch.take_sample(watch.seq());
            (sample, watch.publish(None))
        }
        None => (None, 0),
    };
    let cpu_wait_ns = sample
        .as_ref()
        .and_then(|sample| sample.cpu_wait_base)
        .zip(thread_cpu_wait_ns())
        .map_or(0, |(base, now)| now.saturating_sub(base));
    let stack = sample.map(|sample| sample.stack);
    let nanos = |ticks: Ticks| (ticks as f64 * state.clock.nanos_per_tick()) as u64;
    let gc = thread_gc_within(started, now);
    let gil = crate::watchdog::thread_gil_within(started, now);
    let idents: Vec<u64> = gil.holders.iter().map(|held| held.ident).collect();
    let names = crate::gil::thread_names(py, &idents);
    let unit = SampledUnit {
        duration_ns: nanos(ran),
        threshold_ns: nanos(state.threshold),
        cpu_wait_ns,
        gc_ns: nanos(gc.ticks),
        gc_generation: gc.generation,
        gil_wait_ns: nanos(gil.ticks),
        gil_holders: loopwatch_core::gil::gil_holders(&gil, &names, state.clock.nanos_per_tick()),
        reports_while_running: reported,
        task_name: None,
        scope: None,
    };
    ffi::Py_INCREF(obj);
    #[cfg(Py_3_14)]
    let within = state.contexts.unit.is_some();
    #[cfg(not(Py_3_14))]
    let within = false;
    let handle = Bound::from_borrowed_ptr_or_opt(py, handle);
    let outcome = report(py, state, unit, stack.as_deref(), within, handle);
    if let Err(error) = outcome {
        error.write_unraisable(py, None);
    }
    ffi::Py_DECREF(obj);
}

/// What `loopwatch._sampling.describe_unit` answers: the frames, their (name, module), the C
/// callee's, the task's name and the scope's address.
type Described = (
    Vec<FrameTuple>,
    Vec<(String, String)>,
    Option<(String, String)>,
    Option<String>,
    Option<u64>,
);

/// Names the unit's frames (in Python: modules, the C function at the call site, the task),
/// builds the episode and hands it to the sink. `stack`: the last one read while the unit ran,
/// if any; `within`: it holds the unit's frames only (a unit of a C loop, see `contexts`), else
/// the loop's too. `handle`: what ran, if known (see `_sampling.describe_unit`).
fn report(
    py: Python<'_>,
    state: &mut State,
    mut unit: SampledUnit,
    stack: Option<&[SampledFrame]>,
    within: bool,
    handle: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let (Some(sink), Some(filters)) = (state.sink.as_ref(), state.filters.as_ref()) else {
        return Ok(());
    };
    let sink = sink.clone_ref(py);
    let frames = if within {
        stack
    } else {
        stack.and_then(|stack| unit_frames(stack, is_unit_boundary))
    };
    let sampled: Option<Vec<FrameTuple>> =
        frames.map(|frames| frames.iter().map(frame_to_tuple).collect());
    // The callback is a C function: asyncio's `Handle._run` itself stood still at the read, or a
    // C loop's unit had no Python frame of its own.
    let c_callback = if within {
        stack.is_some_and(<[SampledFrame]>::is_empty)
    } else {
        stack
            .and_then(<[SampledFrame]>::first)
            .is_some_and(|frame| is_unit_boundary(frame) && frame.still)
    };
    let described = py
        .import("loopwatch._sampling")?
        .call_method1("describe_unit", (handle, sampled, c_callback))?;
    let (frames, names, callee, task_name, scope): Described = described.extract()?;
    let frames: Vec<SampledFrame> = frames.into_iter().map(frame_from_tuple).collect();
    let name = |(name, module): (String, String)| FrameName { name, module };
    let names: Vec<FrameName> = names.into_iter().map(name).collect();
    let callee = callee.map(name);
    // C code a C loop called, with no handle to name it by: named as the exact mode names it.
    #[cfg(Py_3_14)]
    let callee = callee.or_else(|| {
        (within && c_callback && frames.is_empty() && task_name.is_none()).then(|| FrameName {
            name: state.contexts.c_callback_name(),
            module: String::new(),
        })
    });
    unit.task_name = task_name;
    unit.scope = scope;
    let Some(episode) = sampled_episode(&unit, &frames, &names, callee.as_ref(), filters) else {
        return Ok(());
    };
    let raw = episode_to_python(py, &episode)?;
    raw.set_item("sampled", true)?;
    sink.bind(py).call1(PyTuple::new(py, [raw])?)?;
    Ok(())
}

// --- 3.11: loopwatch's callable in `Handle._run`'s place ------------------------------

#[cfg(not(Py_3_12))]
use legacy::{register, unregister};

#[cfg(not(Py_3_12))]
mod legacy;

#[cfg(Py_3_14)]
mod contexts;
#[cfg(Py_3_14)]
pub use contexts::on_context_switch;
