//! Hands an episode to Python as a plain dict; `loopwatch._report` turns it into `BlockingCallInfo`.

use loopwatch_core::Episode;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

pub fn episode_to_python<'py>(py: Python<'py>, episode: &Episode) -> PyResult<Bound<'py, PyDict>> {
    let report = PyDict::new(py);
    report.set_item("kind", episode.kind.as_str())?;
    report.set_item("duration_ns", episode.duration_ns)?;
    report.set_item("threshold_ns", episode.threshold_ns)?;
    report.set_item("cpu_wait_ns", episode.cpu_wait_ns)?;
    report.set_item("gc_ns", episode.gc_ns)?;
    report.set_item("gc_generation", episode.gc_generation)?;
    report.set_item("gil_wait_ns", episode.gil_wait_ns)?;
    let holders = episode
        .gil_holders
        .iter()
        .map(|held| {
            (
                held.thread_id,
                held.thread_name.as_deref(),
                held.wait_ns,
                held.running.as_deref(),
            )
                .into_pyobject(py)
        })
        .collect::<PyResult<Vec<Bound<'py, PyTuple>>>>()?;
    report.set_item("gil_holders", holders)?;
    report.set_item("starved", episode.starved())?;
    report.set_item("culprit", episode.culprit)?;
    report.set_item("task_name", episode.task_name.as_deref())?;
    report.set_item("scope", episode.scope)?;
    report.set_item("reports_while_running", episode.reports_while_running)?;
    report.set_item("episode_id", episode.episode_id)?;
    report.set_item("culprits", episode.culprits)?;
    report.set_item("share_ns", episode.share_ns)?;
    let frames = episode
        .stack
        .iter()
        .map(|f| {
            (
                f.name.as_str(),
                f.filename.as_deref(),
                f.lineno,
                f.end_lineno,
                f.duration_ns,
                f.is_c_call,
                f.is_coroutine,
                f.included,
            )
                .into_pyobject(py)
        })
        .collect::<PyResult<Vec<Bound<'py, PyTuple>>>>()?;
    report.set_item("stack", frames)?;
    Ok(report)
}
