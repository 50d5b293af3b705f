//! `loopwatch._native`: the thin binding between CPython's profile hook and loopwatch-core.
//! It translates events and names frames; every decision is the core's.

#[cfg(Py_3_14)]
mod c_loops;
mod codes;
mod courier;
mod errors;
mod events;
mod floor;
mod gcwatch;
mod gil;
mod hook;
mod locals;
mod monitor;
#[cfg(Py_3_14)]
mod monitor_c_loops;
#[cfg(Py_3_12)]
mod monitoring;
mod recording;
mod report;
mod resolve;
#[cfg(Py_3_11)]
mod sampler;
mod stackread;
#[cfg(Py_3_11)]
mod threadend;
mod threadstate;
mod watchdog;

use pyo3::prelude::*;

// The hook's per-thread state, the code-tag cache in `co_extra` and the struct reads all rely on the
// GIL: on a free-threaded build, importing loopwatch turns the GIL back on (CPython says so with a
// RuntimeWarning) rather than race. PyO3 from 0.28 on assumes the opposite unless told.
#[pymodule(gil_used = true)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    codes::init(py)?;
    threadstate::init();
    #[cfg(not(Py_3_11))]
    codes::verify_legacy_lasti(py)?;
    #[cfg(not(Py_3_13))]
    locals::confirm_offset(py)?;
    #[cfg(Py_3_12)]
    monitoring::init();
    stackread::init(py);
    let scope_var = resolve::init(py)?;
    m.add("SCOPE", scope_var)?;
    m.add_class::<monitor::ThreadMonitor>()?;
    m.add_class::<monitor::Filters>()?;
    #[cfg(Py_3_11)]
    m.add_class::<sampler::ThreadSampler>()?;
    m.add_class::<recording::RecordingWriter>()?;
    m.add_class::<recording::RecordingReader>()?;
    m.add_function(wrap_pyfunction!(gcwatch::_gc_callback, m)?)?;
    m.add_function(wrap_pyfunction!(gil::_gil_waits_measured, m)?)?;
    m.add_function(wrap_pyfunction!(locals::_local_variable, m)?)?;
    m.add_function(wrap_pyfunction!(codes::_code_reads, m)?)?;
    m.add_function(wrap_pyfunction!(monitor::_watched, m)?)?;
    m.add_function(wrap_pyfunction!(stackread::_read_stack, m)?)?;
    m.add_function(wrap_pyfunction!(stackread::_stack_reads, m)?)?;
    m.add_function(wrap_pyfunction!(courier::_take_stalls, m)?)?;
    m.add_function(wrap_pyfunction!(courier::_release_stalls, m)?)?;
    m.add_function(wrap_pyfunction!(courier::_dropped_stalls, m)?)?;
    m.add_function(wrap_pyfunction!(watchdog::_wait_thread_gone, m)?)?;
    m.add_function(wrap_pyfunction!(floor::_bench_install_empty_hook, m)?)?;
    m.add_function(wrap_pyfunction!(floor::_bench_uninstall_hook, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "DEFAULT_EXCLUDES",
        loopwatch_core::filter::DEFAULT_EXCLUDES.to_vec(),
    )?;
    Ok(())
}
