//! Telling a wait for the GIL apart from the loop thread's own blocking. A thread that wants the
//! GIL while another holds it sleeps in the kernel on the GIL's condition variable (or its mutex):
//! `/proc/self/task/<tid>/syscall` then shows a `futex` call on an address inside the GIL's
//! state, while a thread blocked in its own call (I/O, `time.sleep`, a lock) shows another call
//! or another address. The watchdog reads that, and who holds the GIL (`last_holder`), about once
//! a millisecond while other threads take the GIL (see `watchdog`); `loopwatch_core::gil` turns
//! its looks into waits.
//!
//! Nothing here relies on a header's offsets alone: the GIL's address is learnt once per process
//! by making a thread of our own wait for the GIL while this one holds it, and seeing where it
//! sleeps; `last_holder` is the one word before that which names this thread's state while it
//! holds the GIL and the helper's while the helper does; the thread state's `thread_id` is the
//! word that holds each thread's `threading` ident. Anything that does not check out leaves the
//! waits unmeasured (0), never guessed at.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::stackread::Memory;

/// Where the GIL's state is, as learnt (see the module's doc).
#[derive(Clone, Copy, Debug)]
pub struct GilLayout {
    /// The address of `last_holder`: the `PyThreadState *` that holds (or last held) the GIL.
    pub last_holder: usize,
    /// The address of `switch_number`: how many times the GIL has changed hands.
    pub switch_number: usize,
    /// A thread asleep in `futex` on an address in `[lo, hi)` waits for the GIL (its condition
    /// variables and mutexes).
    pub futex_lo: usize,
    pub futex_hi: usize,
    /// Where a `PyThreadState` keeps its thread's `threading` ident.
    pub thread_id_offset: usize,
}

impl GilLayout {
    /// Whether a `futex` wait on `address` is a wait for the GIL.
    pub fn is_gil(&self, address: usize) -> bool {
        (self.futex_lo..self.futex_hi).contains(&address)
    }
}

/// `None` once learnt that it cannot be; unset until a thread first watches a loop.
static LAYOUT: OnceLock<Option<GilLayout>> = OnceLock::new();

/// Set by the thread that learns the layout: no other waits for it (it lets the GIL go while it
/// learns, and a thread that waited for it with the GIL held would stop it for good).
static LEARNING: AtomicBool = AtomicBool::new(false);

/// The GIL's layout, if learnt.
pub fn layout() -> Option<&'static GilLayout> {
    LAYOUT.get().and_then(Option::as_ref)
}

/// Learns the GIL's layout, once per process (a few milliseconds, the first time a loop is
/// watched). Must be called with the GIL held, by a thread with a Python thread state. While
/// another thread learns it, `None` at once.
pub fn learn(py: Python<'_>) -> Option<&'static GilLayout> {
    if let Some(learnt) = LAYOUT.get() {
        return learnt.as_ref();
    }
    if finalizing(py) {
        // A new thread may not get the GIL while the interpreter shuts down (it hangs): learn
        // nothing now, and let a later watch learn it.
        return None;
    }
    if LEARNING.swap(true, Ordering::AcqRel) {
        return None;
    }
    let _ = LAYOUT.set(learn_now(py));
    layout()
}

/// Whether the interpreter shuts down (`sys.is_finalizing()`); unknown counts as yes.
fn finalizing(py: Python<'_>) -> bool {
    py.import("sys")
        .and_then(|sys| sys.getattr("is_finalizing")?.call0())
        .and_then(|answer| answer.extract::<bool>())
        .unwrap_or(true)
}

/// How long the helper thread is watched for its wait.
const LEARN_FOR: Duration = Duration::from_millis(200);
/// How far into the GIL's state, past `last_holder`, its condition variables and mutexes end:
/// `locked`, `switch_number`, then two `pthread_cond_t` (48 bytes) and two `pthread_mutex_t`
/// (40 bytes) on 64-bit Linux.
const GIL_TAIL: usize = 8 + 8 + 8 + 2 * 48 + 2 * 40;

#[allow(clippy::useless_conversion)] // `c_ulong` (a thread's ident) is 32 bits on some platforms
fn learn_now(py: Python<'_>) -> Option<GilLayout> {
    if cfg!(Py_GIL_DISABLED)
        || !cfg!(all(target_os = "linux", target_pointer_width = "64"))
        || std::env::var_os("LOOPWATCH_NO_GIL_WAITS").is_some()
        || crate::stackread::unavailable().is_some()
    {
        return None;
    }
    let memory = Memory::new();
    let me = unsafe { ffi::PyThreadState_Get() } as usize;
    let my_ident = u64::from(unsafe { ffi::PyThread_get_thread_ident() });
    // The thread state's `thread_id`: the one word of the first 512 bytes that holds our ident.
    let thread_id_offset = only(
        (0..512)
            .step_by(8)
            .filter(|offset| memory.word(me + offset).map(|word| word as u64) == Some(my_ident)),
    )?;

    let helper_tid = Arc::new(AtomicI64::new(0));
    let last_holder = Arc::new(AtomicUsize::new(0));
    let confirmed = Arc::new(AtomicBool::new(false));
    let helper = {
        let (helper_tid, last_holder, confirmed) =
            (helper_tid.clone(), last_holder.clone(), confirmed.clone());
        std::thread::Builder::new()
            .name("loopwatch-gil".into())
            .spawn(move || {
                helper_tid.store(crate::watchdog::current_tid(), Ordering::Release);
                // Waits here for the GIL, which the learning thread holds.
                let state = unsafe { ffi::PyGILState_Ensure() };
                let memory = Memory::new();
                let mine = unsafe { ffi::PyThreadState_Get() } as usize;
                let ident = u64::from(unsafe { ffi::PyThread_get_thread_ident() });
                let holder = last_holder.load(Ordering::Acquire);
                confirmed.store(
                    holder != 0
                        && memory.word(holder) == Some(mine)
                        && memory.word(mine + thread_id_offset).map(|w| w as u64) == Some(ident),
                    Ordering::Release,
                );
                unsafe { ffi::PyGILState_Release(state) };
            })
            .ok()?
    };
    // Where the helper sleeps: the same futex word seen twice in a row.
    let deadline = Instant::now() + LEARN_FOR;
    let mut address = None;
    let mut previous = None;
    while Instant::now() < deadline && address.is_none() {
        let tid = helper_tid.load(Ordering::Acquire);
        if tid != 0 {
            let now = blocked_in(tid);
            if let (Some(Blocked::Futex(a)), Some(Blocked::Futex(b))) = (previous, now) {
                if a == b {
                    address = Some(a);
                }
            }
            previous = now;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    // `last_holder`: below the condition variable, the one aligned word that names us.
    let holder = address.and_then(|address| {
        only(
            (address.saturating_sub(72) & !7..address.saturating_sub(24))
                .step_by(8)
                .filter(|&word| memory.word(word) == Some(me)),
        )
    });
    last_holder.store(holder.unwrap_or(0), Ordering::Release);
    // `switch_number` two words on: the helper takes the GIL, then this thread again.
    let switches_before = holder.and_then(|holder| memory.word(holder + SWITCH_NUMBER));
    // Let the helper have the GIL, and wait for it.
    py.detach(|| {
        let _ = helper.join();
    });
    let last_holder = holder?;
    let handed_back = memory
        .word(last_holder + SWITCH_NUMBER)
        .zip(switches_before)
        .is_some_and(|(after, before)| after.wrapping_sub(before) >= 2);
    (confirmed.load(Ordering::Acquire) && handed_back && memory.word(last_holder) == Some(me))
        .then_some(GilLayout {
            last_holder,
            switch_number: last_holder + SWITCH_NUMBER,
            futex_lo: last_holder + 24,
            futex_hi: last_holder + GIL_TAIL,
            thread_id_offset,
        })
}

/// Where `switch_number` is from `last_holder`: past `last_holder` and `locked` (an `int`,
/// padded).
const SWITCH_NUMBER: usize = 16;

/// The one item of `items`, or `None` when there are none or several.
fn only<T>(mut items: impl Iterator<Item = T>) -> Option<T> {
    let first = items.next()?;
    items.next().is_none().then_some(first)
}

/// What a thread of this process is blocked in, from `/proc/self/task/<tid>/syscall`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// It runs or waits for a CPU.
    Running,
    /// It sleeps in `futex` on this address.
    Futex(usize),
    /// It sleeps in some other call.
    Other,
}

/// Reads once what thread `tid` is blocked in (opening the file each time: for learning only).
fn blocked_in(tid: i64) -> Option<Blocked> {
    ThreadSyscall::open(tid).blocked()
}

/// A thread's `/proc/self/task/<tid>/syscall`, opened once.
pub struct ThreadSyscall {
    file: Option<std::fs::File>,
}

impl ThreadSyscall {
    pub fn open(tid: i64) -> Self {
        let path = format!("/proc/self/task/{tid}/syscall");
        Self {
            file: std::fs::File::open(path).ok(),
        }
    }

    /// What the thread is blocked in now; `None` where the OS does not say.
    pub fn blocked(&self) -> Option<Blocked> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::FileExt;
            let mut text = [0u8; 256];
            let read = self.file.as_ref()?.read_at(&mut text, 0).ok()?;
            loopwatch_core::cpu_wait::parse_syscall(&text[..read]).map(|blocked| match blocked {
                loopwatch_core::cpu_wait::Syscall::Running => Blocked::Running,
                loopwatch_core::cpu_wait::Syscall::Call { number, first_arg } => {
                    if number == FUTEX {
                        Blocked::Futex(first_arg as usize)
                    } else {
                        Blocked::Other
                    }
                }
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }
}

/// The `futex` system call's number.
#[cfg(target_arch = "x86_64")]
const FUTEX: u64 = 202;
#[cfg(target_arch = "aarch64")]
const FUTEX: u64 = 98;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const FUTEX: u64 = u64::MAX;

/// The names of the threads with these `threading` idents, where `threading` knows them.
pub fn thread_names(py: Python<'_>, idents: &[u64]) -> Vec<Option<String>> {
    let active = py
        .import("sys")
        .and_then(|sys| sys.getattr("modules"))
        .ok()
        .and_then(|modules| modules.get_item("threading").ok())
        .and_then(|threading| threading.getattr("_active").ok())
        .and_then(|active| active.cast_into::<PyDict>().ok());
    idents
        .iter()
        .map(|&ident| {
            let thread = active.as_ref()?.get_item(ident).ok()??;
            thread.getattr("name").ok()?.extract::<String>().ok()
        })
        .collect()
}

/// What the watchdog learns about the GIL's holder: its ident, and what it runs.
pub fn holder_of(layout: &GilLayout, memory: &Memory) -> Option<(usize, u64)> {
    let tstate = memory.word(layout.last_holder)?;
    let ident = memory.word(tstate + layout.thread_id_offset)? as u64;
    Some((tstate, ident))
}

/// Whether waits for the GIL are measured in this process (learning the GIL's layout if it has
/// not been yet).
#[pyfunction]
pub fn _gil_waits_measured(py: Python<'_>) -> bool {
    learn(py).is_some()
}
