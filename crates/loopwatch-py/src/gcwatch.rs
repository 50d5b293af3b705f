//! The garbage collections of each thread, for the core's `gc` log: a callback in
//! `gc.callbacks` (added while a monitor is active, see `loopwatch._monitor`) that CPython calls
//! on the collecting thread when a collection starts and when it stops.

use loopwatch_core::{gc, Clock};
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::watchdog::note_collecting;

/// `gc.callbacks` calls it with `("start" | "stop", {"generation": n, ...})`. Never raises: a
/// call it cannot read is ignored.
#[pyfunction]
pub fn _gc_callback(phase: &Bound<'_, PyAny>, info: &Bound<'_, PyAny>) {
    let now = Clock::new().now();
    let Ok(phase) = phase.cast::<PyString>() else {
        return;
    };
    match phase.to_str() {
        Ok("start") => {
            let generation = info
                .get_item("generation")
                .and_then(|generation| generation.extract::<u8>())
                .unwrap_or(0);
            gc::thread_gc_start(now, generation);
            note_collecting(true);
        }
        Ok("stop") => {
            gc::thread_gc_stop(now);
            note_collecting(false);
        }
        _ => {}
    }
}
