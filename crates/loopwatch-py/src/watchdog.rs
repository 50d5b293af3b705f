//! The watchdog: one thread of loopwatch's own, in Rust, that times each watched loop's running
//! step from outside and reports a stall while it still runs, with the loop thread's Python stack
//! read without the GIL. It needs nothing from the loop's thread, so a report gets out even if a C
//! call there holds the GIL for good: it writes the report to stderr itself.
//!
//! A watched thread publishes only when a unit (callback or task step) starts or ends, which the
//! tracker decides off the hot path. The watchdog wakes every `POLL` while some thread is watched
//! and its loop is busy, sleeps until a running unit is due, and parks when the loops it watches
//! have been idle for a while. Slots are static and never freed, so the watchdog never reads
//! memory a thread has given back; the watchdog only ever tries a lock, never waits for one, so
//! neither a thread that holds one nor a fork that copied one held can stop it.

use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use loopwatch_core::cpu_wait::{OtherThreadCpuWait, ThreadActivity};
use loopwatch_core::gil::{waited_between, Doing, GilLog, GilLook, GilTime, GilWait};
use loopwatch_core::recording::{append, Record, RecordedSample, RecordedStall};
use loopwatch_core::sampled::is_unit_boundary;
use loopwatch_core::{Clock, Look, RunningStall, SampledFrame, StallTimer, Ticks};

use crate::gil::{Blocked, GilLayout, ThreadSyscall};
use crate::stackread::{innermost_frame, read_stack, read_stack_within, Memory};

/// The most threads watched at once; a thread beyond them is watched without stall reports.
const SLOTS: usize = 64;
/// How often the watchdog looks while a loop is busy: the most a unit can run before it is seen.
const POLL: Duration = Duration::from_millis(5);
/// How often the watchdog looks while a loop is busy and other threads take the GIL: how close
/// to its start and end a wait for the GIL is seen.
const GIL_POLL: Duration = Duration::from_millis(1);
/// The longest stretch between two looks that is judged a wait for the GIL (see `GilWatch`).
const GIL_JUDGED_WITHIN: Duration = Duration::from_millis(20);
/// How often at most the stack of one holder of the GIL is read, and how many holders' are kept.
const HOLDER_READ_EVERY: Duration = Duration::from_millis(200);
const HOLDERS_KEPT: usize = 8;
/// How many waits the watchdog keeps for a thread whose log it could not lock.
const PENDING_KEPT: usize = 256;
/// How long after the GIL last changed hands the watchdog goes on looking every `GIL_POLL`.
const GIL_CONTENDED_FOR: Duration = Duration::from_millis(200);
/// Looks with nothing new (no unit started or ended anywhere) before the watchdog parks.
const IDLE_LOOKS_BEFORE_PARKING: u32 = 200;
/// Bytes of a thread name kept for the report.
const NAME_WORDS: usize = 8;

/// One watched thread, as the watchdog sees it. Written by that thread, read by the watchdog.
struct Watch {
    in_use: AtomicBool,
    /// Bumped when the slot is taken and given back: what the watchdog read of a slot whose
    /// generation changed meanwhile is thrown away.
    generation: AtomicU64,
    /// Odd while a unit runs; bumped at each start and end, so each stall has its own number.
    seq: AtomicU64,
    started: AtomicU64,
    threshold: AtomicU64,
    enabled: AtomicBool,
    tstate: AtomicU64,
    tid: AtomicI64,
    /// The thread as Python names it (`threading.get_ident()`).
    ident: AtomicU64,
    /// Recordings that get a record of each report; locked briefly by the thread that sets
    /// them, only tried by the watchdog (which never waits for it).
    recordings: Mutex<Vec<PathBuf>>,
    /// Whether each report also goes to Python callbacks (through `courier`).
    to_python: AtomicBool,
    name: [AtomicU64; NAME_WORDS],
    /// How many reports the watchdog made of unit `reported_seq` while it ran.
    reported_seq: AtomicU64,
    reported: AtomicU32,
    /// The always-on mode: the thread's units are blamed from the stacks the watchdog reads, so
    /// it reads one once a unit has run half the threshold, and at each report, stall reports
    /// or not; a stack without the unit's boundary frame is not the unit's and is dropped.
    sampling: AtomicBool,
    /// Where the running unit's frames end: 0 for asyncio's own loops (the whole stack; in the
    /// always-on mode, inside `Handle._run`); else the address of the frame a C-implemented loop
    /// (uvloop) was called from, which calls each unit from C. A stack without it is not the
    /// unit's.
    boundary: AtomicU64,
    /// The last stack read of a running unit, for its report when it ends. Only tried by the
    /// watchdog; locked by the thread when its unit ends.
    sample: Mutex<Option<Sample>>,
    /// Set by the thread while it runs a garbage collection (see `note_collecting`): a stack
    /// read then shows the frame the collection interrupted, not what the unit was doing.
    collecting: AtomicBool,
    /// The waits for the GIL the watchdog saw the thread make. Only tried by the watchdog;
    /// locked by the thread on its slow path (see `thread_gil_within`).
    gil_waits: Mutex<GilLog>,
}

/// A stack the watchdog read while a unit ran (always-on mode).
pub struct Sample {
    /// The unit it was read in (the watch's `seq`).
    pub seq: u64,
    /// Innermost first, the loop's own frames included; for a unit of a C-implemented loop (see
    /// `Watch::boundary`), the unit's own frames only.
    pub stack: Vec<SampledFrame>,
    /// The thread's CPU wait (ns) the watchdog took as the stall's baseline, if any.
    pub cpu_wait_base: Option<u64>,
    /// Read while the thread ran a garbage collection, or waited for the GIL: not what the
    /// unit's own code was doing.
    pub aside: bool,
}

impl Watch {
    const fn new() -> Self {
        Watch {
            in_use: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            started: AtomicU64::new(0),
            threshold: AtomicU64::new(u64::MAX),
            enabled: AtomicBool::new(false),
            tstate: AtomicU64::new(0),
            tid: AtomicI64::new(0),
            ident: AtomicU64::new(0),
            recordings: Mutex::new(Vec::new()),
            to_python: AtomicBool::new(false),
            name: [const { AtomicU64::new(0) }; NAME_WORDS],
            reported_seq: AtomicU64::new(u64::MAX),
            reported: AtomicU32::new(0),
            sampling: AtomicBool::new(false),
            boundary: AtomicU64::new(0),
            sample: Mutex::new(None),
            collecting: AtomicBool::new(false),
            gil_waits: Mutex::new(GilLog::new()),
        }
    }

    fn set_name(&self, name: &str) {
        let mut bytes = [0u8; NAME_WORDS * 8];
        let mut end = name.len().min(bytes.len());
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        for (word, chunk) in self.name.iter().zip(bytes.chunks_exact(8)) {
            word.store(
                u64::from_ne_bytes(chunk.try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
    }

    fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .name
            .iter()
            .flat_map(|word| word.load(Ordering::Relaxed).to_ne_bytes())
            .take_while(|&b| b != 0)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

static WATCHES: [Watch; SLOTS] = [const { Watch::new() }; SLOTS];

thread_local! {
    /// The slots this thread has taken (a bit each), for `note_collecting`; a bit is believed
    /// only while its slot is in use by this thread's kernel id.
    static MY_SLOTS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Tells the watchdog that the calling thread starts or stops a garbage collection (from
/// `gc.callbacks`): what it reads of the thread's stack meanwhile is marked as such.
pub fn note_collecting(collecting: bool) {
    for watch in my_watches() {
        watch.collecting.store(collecting, Ordering::Release);
    }
}

/// The slots the calling thread holds (see `MY_SLOTS`).
fn my_watches() -> impl Iterator<Item = &'static Watch> {
    let mut slots = MY_SLOTS.with(std::cell::Cell::get);
    let tid = if slots == 0 { 0 } else { current_tid() };
    std::iter::from_fn(move || {
        while slots != 0 {
            let index = slots.trailing_zeros() as usize;
            slots &= slots - 1;
            let watch = &WATCHES[index];
            if watch.in_use.load(Ordering::Relaxed) && watch.tid.load(Ordering::Relaxed) == tid {
                return Some(watch);
            }
        }
        None
    })
}

/// How much of `[from, to)` the calling thread waited for the GIL, as the watchdog saw it (see
/// `gil`): nothing unless the thread is watched and the GIL's layout is known.
pub fn thread_gil_within(from: Ticks, to: Ticks) -> GilTime {
    if crate::gil::layout().is_none() {
        return GilTime::default();
    }
    my_watches()
        .find_map(|watch| {
            watch
                .gil_waits
                .lock()
                .ok()
                .map(|waits| waits.within(from, to))
        })
        .unwrap_or_default()
}

/// Set by the watchdog before it parks; a thread whose unit starts then wakes it.
static PARKED: AtomicBool = AtomicBool::new(false);
/// The watchdog thread of this process (a leaked handle), and the process it was started in: the
/// child of a fork has none until it watches a loop.
static WATCHDOG: AtomicPtr<std::thread::Thread> = AtomicPtr::new(std::ptr::null_mut());
static WATCHDOG_PID: AtomicU32 = AtomicU32::new(0);
/// Asks the watchdog to end (before a fork); it clears `RUNNING` as it goes.
static STOP: AtomicBool = AtomicBool::new(false);
static RUNNING: AtomicBool = AtomicBool::new(false);
/// The watchdog thread's kernel id while it runs (Linux), to see it gone after a join.
static WATCHDOG_TID: AtomicU32 = AtomicU32::new(0);
/// Set after a fork, in parent and child: the next unit to start starts the watchdog again.
static RESTART: AtomicBool = AtomicBool::new(false);
/// The running watchdog, joined when it ends before a fork (a thread that has returned may
/// still count as one until it is joined). Locked only by threads that fork or start it.
static JOIN: std::sync::Mutex<Option<std::thread::JoinHandle<()>>> = std::sync::Mutex::new(None);
/// How long a fork waits for the watchdog to end before it goes on with it running.
const STOP_WAIT: Duration = Duration::from_millis(200);

/// A watched thread's hold on its slot; kept in the thread's monitor state. Gives the slot back
/// when dropped.
pub struct WatchHandle {
    index: usize,
    /// The running unit's start as last published.
    published: Option<Ticks>,
    /// The boundary as last set (see `Watch::boundary`).
    boundary: usize,
}

/// The kernel's id of the calling thread (`/proc/self/task/<tid>`), 0 where there is none.
pub(crate) fn current_tid() -> i64 {
    #[cfg(target_os = "linux")]
    {
        extern "C" {
            fn gettid() -> i32;
        }
        i64::from(unsafe { gettid() })
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

impl WatchHandle {
    /// Takes a slot for the calling thread (whose `PyThreadState` is `tstate`) and makes sure the
    /// watchdog runs. `None` when every slot is taken.
    pub fn register(
        tstate: usize,
        ident: u64,
        name: &str,
        threshold: Ticks,
        enabled: bool,
        sampling: bool,
    ) -> Option<Self> {
        let index = WATCHES.iter().position(|watch| {
            watch
                .in_use
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        let watch = &WATCHES[index];
        watch.tstate.store(tstate as u64, Ordering::Relaxed);
        watch.tid.store(current_tid(), Ordering::Relaxed);
        // After the thread's ids: a watchdog that sees the new generation opens this thread's
        // files, not those of the slot's last user.
        watch.generation.fetch_add(1, Ordering::AcqRel);
        watch.ident.store(ident, Ordering::Relaxed);
        watch.set_name(name);
        if let Ok(mut recordings) = watch.recordings.lock() {
            recordings.clear();
        }
        watch.threshold.store(threshold, Ordering::Relaxed);
        watch.enabled.store(enabled, Ordering::Relaxed);
        watch.sampling.store(sampling, Ordering::Relaxed);
        watch.boundary.store(0, Ordering::Relaxed);
        watch.collecting.store(false, Ordering::Relaxed);
        if let Ok(mut waits) = watch.gil_waits.lock() {
            waits.clear();
        }
        MY_SLOTS.with(|slots| slots.set(slots.get() | (1 << index)));
        if let Ok(mut sample) = watch.sample.lock() {
            *sample = None;
        }
        let seq = watch.seq.load(Ordering::Relaxed);
        watch.seq.store(seq + seq % 2, Ordering::SeqCst);
        ensure_watchdog();
        wake();
        Some(WatchHandle {
            index,
            published: None,
            boundary: 0,
        })
    }

    fn watch(&self) -> &'static Watch {
        &WATCHES[self.index]
    }

    /// New settings: the threshold (ticks) and whether stalls are reported while they run.
    pub fn configure(&self, threshold: Ticks, enabled: bool) {
        self.watch().threshold.store(threshold, Ordering::Relaxed);
        self.watch().enabled.store(enabled, Ordering::Relaxed);
    }

    /// Where each report made while a stall runs goes besides stderr: these recordings, and
    /// Python callbacks (`to_python`).
    pub fn set_destinations(&self, recordings: Vec<PathBuf>, to_python: bool) {
        if let Ok(mut held) = self.watch().recordings.lock() {
            *held = recordings;
        }
        self.watch().to_python.store(to_python, Ordering::Relaxed);
    }

    /// Tells the watchdog when the running unit started (`None`: none runs). Called off the hot
    /// path after each event that may start or end a unit; does nothing unless that changed.
    /// Returns, when a unit has just ended, how many times it was reported while it ran.
    #[inline]
    pub fn publish(&mut self, running_since: Option<Ticks>) -> u32 {
        if self.published == running_since {
            return 0;
        }
        self.published = running_since;
        let watch = self.watch();
        let seq = watch.seq.load(Ordering::Relaxed);
        if !watch.enabled.load(Ordering::Relaxed)
            && !watch.sampling.load(Ordering::Relaxed)
            && crate::gil::layout().is_none()
        {
            // Neither reported nor sampled while running, nor its waits for the GIL measured:
            // the watchdog is neither told nor woken.
            if seq % 2 == 1 {
                watch.seq.store(seq + 1, Ordering::SeqCst);
            }
            return 0;
        }
        let ended = if seq % 2 == 1 { seq } else { u64::MAX };
        match running_since {
            Some(started) => {
                if RESTART.load(Ordering::Relaxed) {
                    ensure_watchdog();
                }
                watch.started.store(started, Ordering::Relaxed);
                // Odd: a new unit (the next number even if one ran: it is judged afresh).
                watch.seq.store(seq + 1 + seq % 2, Ordering::SeqCst);
                if PARKED.load(Ordering::SeqCst) {
                    wake();
                }
            }
            None => watch.seq.store(seq + seq % 2, Ordering::SeqCst),
        }
        if watch.reported_seq.load(Ordering::Acquire) == ended {
            watch.reported.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    /// Where the frames of the units published from now on end (see `Watch::boundary`): call
    /// before publishing a unit's start.
    #[inline]
    pub fn set_boundary(&mut self, frame: usize) {
        if self.boundary != frame {
            self.boundary = frame;
            self.watch().boundary.store(frame as u64, Ordering::Release);
        }
    }

    /// The number of the unit running now (odd), or of the last one (even).
    pub fn seq(&self) -> u64 {
        self.watch().seq.load(Ordering::Relaxed)
    }

    /// The last stack the watchdog read while unit `seq` ran, taken (call before publishing its
    /// end; see `Watch::sample`).
    pub fn take_sample(&self, seq: u64) -> Option<Sample> {
        let mut held = self.watch().sample.lock().ok()?;
        held.take().filter(|sample| sample.seq == seq)
    }

    /// In the child of a fork made on this thread: the other threads are gone, and this one has
    /// a new kernel id. Their slots are given back; the watchdog is started again when needed.
    pub fn after_fork_in_child(&mut self) {
        for (index, watch) in WATCHES.iter().enumerate() {
            if index != self.index && watch.in_use.load(Ordering::Relaxed) {
                watch.generation.fetch_add(1, Ordering::AcqRel);
                watch.in_use.store(false, Ordering::Release);
            }
        }
        self.watch().tid.store(current_tid(), Ordering::Relaxed);
        self.watch().generation.fetch_add(1, Ordering::AcqRel);
        self.publish(None);
        ensure_watchdog();
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        let watch = self.watch();
        let seq = watch.seq.load(Ordering::Relaxed);
        watch.seq.store(seq + seq % 2, Ordering::SeqCst);
        watch.generation.fetch_add(1, Ordering::AcqRel);
        watch.in_use.store(false, Ordering::Release);
    }
}

fn own_pid() -> u32 {
    std::process::id()
}

/// Starts the watchdog thread of this process if it is not running.
fn ensure_watchdog() {
    let pid = own_pid();
    RESTART.store(false, Ordering::Relaxed);
    if WATCHDOG_PID.load(Ordering::Acquire) == pid {
        return;
    }
    if WATCHDOG_PID.swap(pid, Ordering::AcqRel) == pid {
        return; // another thread of this process started it just now
    }
    register_fork_handlers();
    STOP.store(false, Ordering::SeqCst);
    RUNNING.store(true, Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name("loopwatch-watchdog".into())
        .spawn(run);
    if let Ok(handle) = spawned {
        let thread = Box::into_raw(Box::new(handle.thread().clone()));
        // The handle of a previous watchdog (before a fork) is left leaked.
        WATCHDOG.store(thread, Ordering::Release);
        if let Ok(mut join) = JOIN.lock() {
            *join = Some(handle);
        }
    } else {
        RUNNING.store(false, Ordering::SeqCst);
        WATCHDOG_PID.store(0, Ordering::Release);
    }
}

/// A fork copies only the forking thread, and CPython warns (from 3.12) when a process that has
/// other threads forks: so the watchdog ends before each fork and starts again in parent and
/// child with the first unit that runs after it. `pthread_atfork` rather than Python's
/// `os.register_at_fork`, whose parent hooks run before CPython counts the threads.
fn register_fork_handlers() {
    #[cfg(unix)]
    {
        static REGISTERED: AtomicBool = AtomicBool::new(false);
        extern "C" {
            fn pthread_atfork(
                prepare: Option<unsafe extern "C" fn()>,
                parent: Option<unsafe extern "C" fn()>,
                child: Option<unsafe extern "C" fn()>,
            ) -> i32;
        }
        unsafe extern "C" fn before_fork() {
            stop_watchdog();
        }
        unsafe extern "C" fn after_fork() {
            if WATCHDOG_PID.load(Ordering::Acquire) == 0 {
                RESTART.store(true, Ordering::Relaxed);
            }
        }
        if !REGISTERED.swap(true, Ordering::AcqRel) {
            unsafe { pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork)) };
        }
    }
}

/// Ends the watchdog thread, waiting for it at most `STOP_WAIT`.
fn stop_watchdog() {
    if WATCHDOG_PID.load(Ordering::Acquire) != own_pid() || !RUNNING.load(Ordering::SeqCst) {
        return;
    }
    STOP.store(true, Ordering::SeqCst);
    wake();
    let deadline = std::time::Instant::now() + STOP_WAIT;
    while RUNNING.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    if !RUNNING.load(Ordering::SeqCst) {
        if let Some(handle) = JOIN.lock().ok().and_then(|mut join| join.take()) {
            let _ = handle.join();
        }
        WATCHDOG_PID.store(0, Ordering::Release);
        gone_from_the_kernel(WATCHDOG_TID.swap(0, Ordering::SeqCst), deadline);
    }
}

/// Waits (until `deadline` at most) for a joined thread to leave the kernel's list of this
/// process's threads: a join returns as the thread exits, a little before the kernel stops
/// counting it, and CPython counts threads that way when it warns of a multi-threaded fork.
fn gone_from_the_kernel(tid: u32, deadline: std::time::Instant) {
    if tid != 0 {
        let task = format!("/proc/self/task/{tid}");
        while std::path::Path::new(&task).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// For loopwatch's own Python threads (the stall courier): `gone_from_the_kernel` for a joined
/// thread's native id, waiting at most `timeout_s` with the GIL released.
#[pyfunction]
pub fn _wait_thread_gone(py: Python<'_>, native_id: Option<u32>, timeout_s: f64) {
    let timeout = Duration::from_secs_f64(timeout_s.clamp(0.0, 1.0));
    let deadline = std::time::Instant::now() + timeout;
    py.detach(|| gone_from_the_kernel(native_id.unwrap_or(0), deadline));
}

fn wake() {
    let thread = WATCHDOG.load(Ordering::Acquire);
    if !thread.is_null() && WATCHDOG_PID.load(Ordering::Acquire) == own_pid() {
        unsafe { (*thread).unpark() };
    }
}

/// What the watchdog keeps per slot between looks.
#[derive(Default)]
struct Seen {
    generation: u64,
    timer: StallTimer,
    cpu_wait: Option<OtherThreadCpuWait>,
    /// What the OS sees the thread do, for the stack reader (is a frame standing still in a call?).
    activity: Option<ThreadActivity>,
    /// The last unit a stack was read in for the always-on mode.
    sampled_seq: u64,
    /// What the thread is blocked in (for its waits for the GIL).
    syscall: Option<ThreadSyscall>,
    /// The last look at the thread for its waits for the GIL.
    gil_look: Option<GilLook>,
    /// The GIL's holder at that look: its thread state, ident and what it was running.
    holder: Option<(usize, u64, Option<String>)>,
    /// What the latest holders were running, and when that was read (a stack read costs tens
    /// of system calls: each holder's is read again only after `HOLDER_READ_EVERY`).
    holders_read: Vec<(usize, Ticks, Option<String>)>,
    /// Waits not yet handed to the thread's log (it was locked).
    pending: Vec<GilWait>,
}

fn run() {
    // "/proc/thread-self" links to "<pid>/task/<tid>" (Linux).
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|link| link.file_name()?.to_str()?.parse::<u32>().ok());
    WATCHDOG_TID.store(tid.unwrap_or(0), Ordering::SeqCst);
    let clock = Clock::new();
    let mut seen: Vec<Seen> = (0..SLOTS).map(|_| Seen::default()).collect();
    let mut last_seqs = [0u64; SLOTS];
    let mut idle_looks = 0u32;
    let mut gil = GilWatch::new(&clock);
    loop {
        if STOP.load(Ordering::SeqCst) {
            RUNNING.store(false, Ordering::SeqCst);
            return;
        }
        let now = clock.now();
        let contended = gil.contended(now);
        gil.awake = false;
        let mut next: Option<Ticks> = None;
        let mut busy = false;
        let mut changed = false;
        for (index, watch) in WATCHES.iter().enumerate() {
            if !watch.in_use.load(Ordering::Acquire) {
                continue;
            }
            let generation = watch.generation.load(Ordering::Acquire);
            let mine = &mut seen[index];
            if mine.generation != generation {
                *mine = Seen {
                    generation,
                    timer: StallTimer::default(),
                    cpu_wait: Some(OtherThreadCpuWait::open(watch.tid.load(Ordering::Relaxed))),
                    activity: Some(ThreadActivity::open(watch.tid.load(Ordering::Relaxed))),
                    sampled_seq: 0,
                    syscall: Some(ThreadSyscall::open(watch.tid.load(Ordering::Relaxed))),
                    ..Seen::default()
                };
            }
            let seq = watch.seq.load(Ordering::Acquire);
            changed |= std::mem::replace(&mut last_seqs[index], seq) != seq;
            if contended && gil.due(mine, seq, now) {
                gil.look(watch, mine, &clock);
            }
            if let Some(at) = look_at(watch, mine, (generation, seq), now, &clock, &mut gil) {
                busy = true;
                if let Some(at) = at {
                    next = Some(next.map_or(at, |n: Ticks| n.min(at)));
                }
            }
        }
        idle_looks = if changed || busy { 0 } else { idle_looks + 1 };
        if idle_looks >= IDLE_LOOKS_BEFORE_PARKING {
            PARKED.store(true, Ordering::SeqCst);
            // A unit that started before the flag was seen is found by this look; one that starts
            // after it sees the flag and wakes us.
            let started_meanwhile = WATCHES.iter().enumerate().any(|(index, watch)| {
                watch.in_use.load(Ordering::SeqCst)
                    && watch.seq.load(Ordering::SeqCst) != last_seqs[index]
            });
            if !started_meanwhile {
                std::thread::park();
            }
            PARKED.store(false, Ordering::SeqCst);
            idle_looks = 0;
            continue;
        }
        // Every millisecond while the GIL changes hands and a watched loop runs a unit, or its
        // thread was last seen running or waiting for the GIL (a unit the watchdog is not told
        // of: one that was running when the thread began to be watched).
        let poll = if contended && (busy || gil.awake) {
            GIL_POLL
        } else {
            POLL
        };
        let sleep = next.map_or(poll, |at| {
            let ticks = at.saturating_sub(clock.now());
            Duration::from_nanos((ticks as f64 * clock.nanos_per_tick()) as u64).min(poll)
        });
        std::thread::park_timeout(sleep);
    }
}

/// What the watchdog keeps to see waits for the GIL (see `gil`).
struct GilWatch {
    layout: Option<&'static GilLayout>,
    memory: Memory,
    /// The GIL's switch count at the last look, and until when the GIL counts as contended.
    switches: usize,
    contended_until: Ticks,
    contended_for: Ticks,
    /// How far apart two looks may be for the stretch between them to be judged.
    judged_within: Ticks,
    /// Whether a look in this round saw a thread run or wait for the GIL.
    awake: bool,
    holder_read_every: Ticks,
    /// How often a thread whose loop waits for work is looked at (`POLL`).
    idle_every: Ticks,
    nanos_per_tick: f64,
}

impl GilWatch {
    fn new(clock: &Clock) -> Self {
        GilWatch {
            layout: None,
            memory: Memory::new(),
            switches: 0,
            contended_until: 0,
            awake: false,
            contended_for: (GIL_CONTENDED_FOR.as_nanos() as f64 / clock.nanos_per_tick()) as Ticks,
            judged_within: (GIL_JUDGED_WITHIN.as_nanos() as f64 / clock.nanos_per_tick()) as Ticks,
            holder_read_every: (HOLDER_READ_EVERY.as_nanos() as f64 / clock.nanos_per_tick())
                as Ticks,
            idle_every: (POLL.as_nanos() as f64 / clock.nanos_per_tick()) as Ticks,
            nanos_per_tick: clock.nanos_per_tick(),
        }
    }

    /// Whether the GIL has changed hands lately: only then can a watched thread wait for it.
    fn contended(&mut self, now: Ticks) -> bool {
        if self.layout.is_none() {
            self.layout = crate::gil::layout();
        }
        let Some(layout) = self.layout else {
            return false;
        };
        // Any change of hands since the last look: a thread that holds the GIL for a moment
        // between long holds of another still counts.
        let switches = self.memory.word(layout.switch_number).unwrap_or(0);
        if switches != self.switches {
            self.switches = switches;
            self.contended_until = now.saturating_add(self.contended_for);
        }
        now < self.contended_until
    }

    /// Whether to look at a thread now: every round while it runs a unit, or was last seen
    /// running or waiting for the GIL; else (its loop waits for work) every `POLL`, so that many
    /// idle loops cost little.
    fn due(&self, mine: &Seen, seq: u64, now: Ticks) -> bool {
        seq % 2 == 1
            || mine.gil_look.is_none_or(|look| {
                look.doing != Doing::Sleeping || now.saturating_sub(look.at) >= self.idle_every
            })
    }

    /// Whether the thread waits for the GIL now, read afresh: what its holder runs (empty when
    /// not known), or `None` when it does not wait (or it cannot be told).
    fn waiting_now(&self, watch: &Watch, mine: &mut Seen) -> Option<String> {
        let layout = self.layout?;
        match mine.syscall.as_ref().and_then(ThreadSyscall::blocked)? {
            Blocked::Futex(address) if layout.is_gil(address) => {
                let holder = crate::gil::holder_of(layout, &self.memory)
                    .map(|(tstate, _)| tstate)
                    .filter(|&tstate| tstate != watch.tstate.load(Ordering::Relaxed) as usize);
                let now = mine.gil_look.map_or(0, |look| look.at);
                Some(
                    holder
                        .and_then(|tstate| self.holder_running(mine, tstate, now))
                        .unwrap_or_default(),
                )
            }
            _ => None,
        }
    }

    /// What the holder whose thread state is `tstate` is running: read from its stack, or as
    /// read less than `HOLDER_READ_EVERY` ago.
    fn holder_running(&self, mine: &mut Seen, tstate: usize, now: Ticks) -> Option<String> {
        let fresh = mine.holders_read.iter().find(|(read, at, _)| {
            *read == tstate && now.saturating_sub(*at) < self.holder_read_every
        });
        if let Some((_, _, running)) = fresh {
            return running.clone();
        }
        let running = innermost_frame(tstate).map(|frame| {
            let file = frame.filename.rsplit('/').next().unwrap_or_default();
            match frame.line {
                Some(line) => format!("{} ({file}:{line})", frame.function),
                None => format!("{} ({file})", frame.function),
            }
        });
        mine.holders_read.retain(|(read, _, _)| *read != tstate);
        if mine.holders_read.len() >= HOLDERS_KEPT {
            mine.holders_read.remove(0);
        }
        mine.holders_read.push((tstate, now, running.clone()));
        running
    }

    /// Looks at what the thread does, and logs the wait for the GIL it made since the last
    /// look, if it made one. Waits are logged by time, in or out of a unit: a unit takes off
    /// those that fall inside it.
    fn look(&mut self, watch: &Watch, mine: &mut Seen, clock: &Clock) {
        let Some(layout) = self.layout else { return };
        let blocked = mine.syscall.as_ref().and_then(ThreadSyscall::blocked);
        let at = clock.now();
        let cpu_ns = mine.activity.as_ref().and_then(ThreadActivity::cpu_ns);
        let cpu_wait_ns = mine.cpu_wait.as_ref().and_then(OtherThreadCpuWait::wait_ns);
        let (Some(blocked), Some(cpu_ns), Some(cpu_wait_ns)) = (blocked, cpu_ns, cpu_wait_ns)
        else {
            mine.gil_look = None;
            return;
        };
        let doing = match blocked {
            Blocked::Running => Doing::Running,
            Blocked::Futex(address) if layout.is_gil(address) => {
                let holder = crate::gil::holder_of(layout, &self.memory);
                match holder {
                    // The thread itself, letting go: it waits for another to take the GIL (the
                    // one it waited on before, if it did).
                    Some((tstate, _))
                        if tstate == watch.tstate.load(Ordering::Relaxed) as usize =>
                    {
                        Doing::Gil {
                            holder: mine.holder.as_ref().map_or(0, |(_, ident, _)| *ident),
                        }
                    }
                    Some((tstate, ident)) => {
                        // Read again at most every `HOLDER_READ_EVERY`, while it holds on.
                        let running = self.holder_running(mine, tstate, at);
                        mine.holder = Some((tstate, ident, running));
                        Doing::Gil { holder: ident }
                    }
                    None => Doing::Gil { holder: 0 },
                }
            }
            Blocked::Futex(_) | Blocked::Other => Doing::Sleeping,
        };
        let look = GilLook {
            at,
            cpu_ns,
            cpu_wait_ns,
            doing,
        };
        self.awake |= doing != Doing::Sleeping;
        if let Some(previous) = mine.gil_look {
            // Looks further apart than the watchdog looks while the GIL changes hands may hold
            // anything (it was late, or had stopped looking): only close ones are judged.
            let close = at.saturating_sub(previous.at) <= self.judged_within;
            let waited = waited_between(&previous, &look, self.nanos_per_tick).filter(|_| close);
            if let Some((waited_ns, holder)) = waited {
                let running = mine
                    .holder
                    .as_ref()
                    .filter(|(_, ident, _)| *ident == holder)
                    .and_then(|(_, _, running)| running.clone());
                if mine.pending.len() >= PENDING_KEPT {
                    mine.pending.remove(0);
                }
                mine.pending.push(GilWait {
                    start: previous.at,
                    end: at,
                    waited: (waited_ns as f64 / self.nanos_per_tick) as Ticks,
                    holder,
                    holder_running: running,
                });
            }
        }
        mine.gil_look = Some(look);
        if !mine.pending.is_empty() {
            // Never waits: the thread holds the lock only while it reads its waits.
            if let Ok(mut waits) = watch.gil_waits.try_lock() {
                for wait in mine.pending.drain(..) {
                    waits.add(wait);
                }
            }
        }
    }
}

/// Looks at one watched thread whose unit counter reads `seq`: reports its running unit if due,
/// and in the always-on mode keeps a stack of it. `None` when nothing runs there that the
/// watchdog times; else when to look again, if at a set time.
fn look_at(
    watch: &Watch,
    mine: &mut Seen,
    (generation, seq): (u64, u64),
    now: Ticks,
    clock: &Clock,
    gil: &mut GilWatch,
) -> Option<Option<Ticks>> {
    let enabled = watch.enabled.load(Ordering::Relaxed);
    let sampling = watch.sampling.load(Ordering::Relaxed);
    if seq % 2 == 0 {
        return None;
    }
    if !(enabled || sampling) {
        // Busy, for its waits for the GIL only.
        return crate::gil::layout().is_some().then_some(None);
    }
    let started = watch.started.load(Ordering::Relaxed);
    fence(Ordering::Acquire);
    if watch.seq.load(Ordering::Relaxed) != seq {
        return Some(None); // it ended while we read
    }
    let threshold = watch.threshold.load(Ordering::Relaxed);
    let wait = if mine.timer.needs_cpu_wait(seq, started, now, threshold) {
        mine.cpu_wait.as_ref().and_then(OtherThreadCpuWait::wait_ns)
    } else {
        None
    };
    let look = mine
        .timer
        .look(seq, started, now, threshold, clock.nanos_per_tick(), wait);
    let mut next: Option<Ticks> = None;
    let mut wake_at = |at: Ticks| next = Some(next.map_or(at, |n| n.min(at)));
    let unit = Unit {
        generation,
        seq,
        cpu_wait_base: mine.timer.cpu_wait_base(),
        waiting_for_gil: matches!(
            mine.gil_look,
            // Taken in this round of looks, after `now` was read.
            Some(look) if look.at >= now && matches!(look.doing, Doing::Gil { .. })
        ),
    };
    match look {
        Look::Idle => {}
        Look::Until(at) => wake_at(at),
        Look::Report {
            so_far,
            number,
            next: at,
        } => {
            if sampling {
                mine.sampled_seq = seq;
            }
            // Asked afresh (the looks are taken only while the GIL changes hands).
            let waiting_for_gil = gil.waiting_now(watch, mine).or_else(|| {
                unit.waiting_for_gil.then(|| {
                    mine.holder
                        .as_ref()
                        .and_then(|(_, _, running)| running.clone())
                        .unwrap_or_default()
                })
            });
            report(
                watch,
                &unit,
                mine.activity.as_ref(),
                so_far,
                number,
                clock,
                waiting_for_gil,
            );
            wake_at(at);
        }
    }
    if sampling && mine.sampled_seq != seq {
        // A unit that ends between half the threshold and the threshold's report, with the
        // watchdog late, still has a stack to be blamed from.
        let half = started.saturating_add(threshold / 2);
        if now >= half {
            mine.sampled_seq = seq;
            keep_sample(watch, &unit, mine.activity.as_ref());
        } else {
            wake_at(half);
        }
    }
    Some(next)
}

/// The unit a look is about.
struct Unit {
    generation: u64,
    seq: u64,
    cpu_wait_base: Option<u64>,
    /// The thread waited for the GIL at the watchdog's look just now.
    waiting_for_gil: bool,
}

/// Reads the running unit's stack; `None` if the unit ended (or the thread stopped being
/// watched) while it was read, or, in the always-on mode, if the stack is not the unit's. With
/// it, whether it was read during a garbage collection, and whether it holds the unit's own
/// frames only (read from a C loop's frame, see `Watch::boundary`).
fn read_unit_stack(
    watch: &Watch,
    generation: u64,
    seq: u64,
    activity: Option<&ThreadActivity>,
) -> Option<(Vec<SampledFrame>, bool, bool)> {
    let tstate = watch.tstate.load(Ordering::Relaxed) as usize;
    let sampling = watch.sampling.load(Ordering::Relaxed);
    let boundary = watch.boundary.load(Ordering::Acquire) as usize;
    let stack = if boundary != 0 {
        // Not from where the unit was called: it has ended, or the stack was read amiss.
        read_stack_within(tstate, activity, boundary)?
    } else {
        read_stack(tstate, activity).unwrap_or_default()
    };
    let in_gc = watch.collecting.load(Ordering::Acquire);
    if watch.generation.load(Ordering::Acquire) != generation
        || watch.seq.load(Ordering::Acquire) != seq
    {
        return None;
    }
    if sampling && boundary == 0 && !stack.iter().any(is_unit_boundary) {
        // The unit's end was missed (an exception the loop lets through): nothing runs in it.
        return None;
    }
    Some((stack, in_gc, boundary != 0))
}

/// Keeps a stack of the running unit for its report when it ends (always-on mode).
fn keep_sample(watch: &Watch, unit: &Unit, activity: Option<&ThreadActivity>) {
    if let Some((stack, in_gc, _)) = read_unit_stack(watch, unit.generation, unit.seq, activity) {
        store_sample(watch, unit, stack, in_gc);
    }
}

/// Keeps the latest stack of the unit, unless it was read during a garbage collection or a wait
/// for the GIL and an earlier one of the same unit was not: that one says what the unit's own
/// code was doing.
fn store_sample(watch: &Watch, unit: &Unit, stack: Vec<SampledFrame>, in_gc: bool) {
    let aside = in_gc || unit.waiting_for_gil;
    // Never waits: the thread holds the lock only while it takes the sample at a unit's end.
    if let Ok(mut held) = watch.sample.try_lock() {
        let keep_earlier = aside
            && held
                .as_ref()
                .is_some_and(|earlier| earlier.seq == unit.seq && !earlier.aside);
        if !keep_earlier {
            *held = Some(Sample {
                seq: unit.seq,
                stack,
                cpu_wait_base: unit.cpu_wait_base,
                aside,
            });
        }
    }
}

/// Reads the stalled thread's stack and writes the report, to stderr and to the thread's
/// recordings; counts it for the unit's final report. In the always-on mode the stack is also
/// kept to blame the unit from, even when stalls are not reported while they run.
fn report(
    watch: &Watch,
    unit: &Unit,
    activity: Option<&ThreadActivity>,
    so_far: Ticks,
    number: u32,
    clock: &Clock,
    waiting_for_gil: Option<String>,
) {
    let Some((stack, in_gc, within)) = read_unit_stack(watch, unit.generation, unit.seq, activity)
    else {
        return;
    };
    if watch.sampling.load(Ordering::Relaxed) {
        store_sample(watch, unit, stack.clone(), in_gc);
    }
    if !watch.enabled.load(Ordering::Relaxed) {
        return;
    }
    let seq = unit.seq;
    watch.reported.store(number, Ordering::Relaxed);
    watch.reported_seq.store(seq, Ordering::Release);
    let ms = |ticks: Ticks| ticks as f64 * clock.nanos_per_tick() / 1e6;
    // A unit of a C loop is read from where the loop was called: nothing above it is C code.
    let in_c_code = within && stack.is_empty();
    let stall = RunningStall {
        pid: own_pid(),
        thread_name: watch.name(),
        so_far_ms: ms(so_far),
        stack,
        in_gc,
        in_c_code,
        waiting_for_gil,
    };
    write_stderr(stall.to_text().as_bytes());
    let recordings = watch
        .recordings
        .try_lock()
        .map(|paths| paths.clone())
        .unwrap_or_default();
    let to_python = watch.to_python.load(Ordering::Relaxed);
    if recordings.is_empty() && !to_python {
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64());
    let record = Record::Stall(Box::new(RecordedStall {
        timestamp: now - stall.so_far_ms / 1e3,
        process_id: stall.pid,
        thread_id: watch.ident.load(Ordering::Relaxed),
        thread_name: stall.thread_name,
        so_far_ms: stall.so_far_ms,
        threshold_ms: ms(watch.threshold.load(Ordering::Relaxed)),
        number,
        stack: stall
            .stack
            .into_iter()
            .map(|frame| RecordedSample {
                filename: frame.filename,
                function: frame.function,
                lineno: frame.line,
            })
            .collect(),
        in_gc: stall.in_gc,
    }));
    for path in recordings {
        // Only files the program's recorder opened (and checked) are added to: never created.
        if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(path) {
            let _ = append(&mut file, &record);
        }
    }
    if let (true, Record::Stall(stall)) = (to_python, record) {
        crate::courier::leave(*stall);
    }
}

/// Writes to the process's stderr directly (no Python, no lock), in as few writes as it takes.
fn write_stderr(mut bytes: &[u8]) {
    #[cfg(unix)]
    {
        extern "C" {
            fn write(fd: i32, buf: *const std::ffi::c_void, count: usize) -> isize;
        }
        while !bytes.is_empty() {
            let written = unsafe { write(2, bytes.as_ptr().cast(), bytes.len()) };
            if written <= 0 {
                return;
            }
            bytes = &bytes[written as usize..];
        }
    }
    #[cfg(not(unix))]
    {
        use std::io::Write;
        let _ = std::io::stderr().write_all(bytes);
    }
}
