//! Reports of running stalls on their way to Python callbacks: the watchdog leaves each one here
//! (never waiting for the lock: it must not be held up), and a Python thread of loopwatch's own,
//! `loopwatch._stalls`'s courier, takes them with the GIL released and calls the callbacks as soon
//! as it can have the GIL. While a C call on the loop's thread holds the GIL, they wait here; the
//! watchdog's own stderr line and recording records do not.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use loopwatch_core::recording::RecordedStall;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::recording::stall_to_python;

/// The most reports waiting; past it the oldest are dropped (and counted).
const MAX_WAITING: usize = 256;

static WAITING: Mutex<VecDeque<RecordedStall>> = Mutex::new(VecDeque::new());
static READY: Condvar = Condvar::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Set to end every wait at once (the courier stops before a fork and at exit).
static RELEASED: AtomicBool = AtomicBool::new(false);

/// Leaves a report for the courier. Called by the watchdog: never blocks.
pub fn leave(stall: RecordedStall) {
    let Ok(mut waiting) = WAITING.try_lock() else {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if waiting.len() >= MAX_WAITING {
        waiting.pop_front();
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
    waiting.push_back(stall);
    drop(waiting);
    READY.notify_all();
}

/// Waits up to `timeout_s` (with the GIL released) for reports of running stalls, and takes all
/// that wait: dicts with `StallInfo`'s fields. Returns at once, empty, after `_release_stalls()`.
#[pyfunction]
pub fn _take_stalls(py: Python<'_>, timeout_s: f64) -> PyResult<Vec<Bound<'_, PyDict>>> {
    let timeout = Duration::from_secs_f64(timeout_s.clamp(0.0, 3600.0));
    let taken: Vec<RecordedStall> = py.detach(|| {
        let Ok(mut waiting) = WAITING.lock() else {
            return Vec::new();
        };
        if waiting.is_empty() && !RELEASED.load(Ordering::SeqCst) {
            waiting = match READY.wait_timeout(waiting, timeout) {
                Ok((guard, _)) => guard,
                Err(_) => return Vec::new(),
            };
        }
        waiting.drain(..).collect()
    });
    taken
        .iter()
        .map(|stall| stall_to_python(py, stall))
        .collect()
}

/// Ends every wait of `_take_stalls` now and makes later ones return at once (`release=True`),
/// or lets them wait again (`release=False`).
#[pyfunction]
#[pyo3(signature = (release=true))]
pub fn _release_stalls(release: bool) {
    RELEASED.store(release, Ordering::SeqCst);
    if release {
        // Taking the lock orders the flag before a waiter's check of it.
        drop(WAITING.lock());
        READY.notify_all();
    }
}

/// How many reports were dropped, waiting for the courier, since the last call.
#[pyfunction]
pub fn _dropped_stalls() -> u64 {
    DROPPED.swap(0, Ordering::Relaxed)
}
