//! Reading a thread's Python stack from another thread, without the GIL, while it runs: what the
//! watchdog does when a step has run past the threshold, even if a C call holds the GIL. As
//! faulthandler and out-of-process samplers do, it follows the thread state's frame chain; every
//! read goes through `process_vm_readv` on our own process, so an address that has just been freed
//! gives an error instead of a fault, and every object read is checked (its type, its size) before
//! it is believed. A stack that does not check out is cut or dropped, never guessed at.
//!
//! Offsets are `offsetof` values from each version's headers (3.9-3.15, `x86_64` and other 64-bit
//! Linux), confirmed at import against the interpreter's own view of the importing thread.

use std::collections::HashMap;
use std::sync::OnceLock;

use loopwatch_core::cpu_wait::ThreadActivity;
use loopwatch_core::{LineTable, SampledFrame};
use pyo3::ffi;
use pyo3::prelude::*;

/// How a version chains its frames.
#[derive(Clone, Copy)]
enum Chain {
    /// 3.9, 3.10: `PyFrameObject`s; `f_lasti` counts bytes (3.9) or code units (3.10).
    #[cfg_attr(Py_3_11, allow(dead_code))]
    Objects {
        back: usize,
        code: usize,
        lasti: usize,
        lasti_bytes: usize,
    },
    /// 3.11+: `_PyInterpreterFrame`s; frames whose `owner` is at least `foreign_owner` are the
    /// interpreter's own (C-stack entry and shim frames), not Python code.
    #[cfg_attr(not(Py_3_11), allow(dead_code))]
    Interpreter {
        code: usize,
        previous: usize,
        instr: usize,
        owner: usize,
        foreign_owner: u8,
    },
}

#[derive(Clone, Copy)]
struct Layout {
    /// The thread state's field for the running frame.
    tstate_frame: usize,
    /// 3.11, 3.12: that field is a `_PyCFrame *`, whose `current_frame` is at this offset.
    via_cframe: Option<usize>,
    chain: Chain,
    co_filename: usize,
    /// `co_qualname` from 3.11, `co_name` before.
    co_name: usize,
    co_firstlineno: usize,
    co_flags: usize,
    co_linetable: usize,
    /// 3.11+: where the code's instructions start inside the code object.
    co_code_adaptive: usize,
    /// 3.11+: `_co_firsttraceable`, the first instruction of the code's own (code units): a frame
    /// not past it is "incomplete" (the interpreter's own shim, or one still being set up), and
    /// CPython leaves it out of every stack it shows.
    co_firsttraceable: usize,
    table: LineTable,
    /// `sizeof(PyASCIIObject)` and `sizeof(PyCompactUnicodeObject)`: where a string's characters start.
    ascii_size: usize,
    compact_size: usize,
    /// 3.14+: the low bits of a `_PyStackRef` are tags, not address.
    tag_bits: usize,
}

#[cfg(not(Py_3_10))]
const LAYOUT: Layout = Layout {
    tstate_frame: 24,
    via_cframe: None,
    chain: Chain::Objects {
        back: 24,
        code: 32,
        lasti: 104,
        lasti_bytes: 1,
    },
    co_filename: 104,
    co_name: 112,
    co_firstlineno: 40,
    co_flags: 36,
    co_linetable: 120,
    co_code_adaptive: 0,
    co_firsttraceable: 0,
    table: LineTable::Lnotab,
    ascii_size: 48,
    compact_size: 72,
    tag_bits: 0,
};
#[cfg(all(Py_3_10, not(Py_3_11)))]
const LAYOUT: Layout = Layout {
    chain: Chain::Objects {
        back: 24,
        code: 32,
        lasti: 96,
        lasti_bytes: 2,
    },
    table: LineTable::Pep626,
    tstate_frame: 24,
    via_cframe: None,
    co_filename: 104,
    co_name: 112,
    co_firstlineno: 40,
    co_flags: 36,
    co_linetable: 120,
    co_code_adaptive: 0,
    co_firsttraceable: 0,
    ascii_size: 48,
    compact_size: 72,
    tag_bits: 0,
};
#[cfg(all(Py_3_11, not(Py_3_12)))]
const LAYOUT: Layout = Layout {
    tstate_frame: 56,
    via_cframe: Some(8),
    chain: Chain::Interpreter {
        code: 32,
        previous: 48,
        instr: 56,
        owner: 69,
        foreign_owner: 3, // 3.11 has none
    },
    co_filename: 112,
    co_name: 128,
    co_firstlineno: 72,
    co_flags: 48,
    co_linetable: 136,
    co_code_adaptive: 184,
    co_firsttraceable: 168,
    table: LineTable::Locations,
    ascii_size: 48,
    compact_size: 72,
    tag_bits: 0,
};
#[cfg(all(Py_3_12, not(Py_3_13)))]
const LAYOUT: Layout = Layout {
    tstate_frame: 56,
    via_cframe: Some(0),
    chain: Chain::Interpreter {
        code: 0,
        previous: 8,
        instr: 56,
        owner: 70,
        foreign_owner: 3, // FRAME_OWNED_BY_CSTACK
    },
    co_filename: 112,
    co_name: 128,
    co_firstlineno: 68,
    co_flags: 48,
    co_linetable: 136,
    co_code_adaptive: 192,
    co_firsttraceable: 176,
    table: LineTable::Locations,
    ascii_size: 40,
    compact_size: 56,
    tag_bits: 0,
};
#[cfg(all(Py_3_13, not(Py_3_14)))]
const LAYOUT: Layout = Layout {
    tstate_frame: 72,
    via_cframe: None,
    chain: Chain::Interpreter {
        code: 0,
        previous: 8,
        instr: 56,
        owner: 70,
        foreign_owner: 3, // FRAME_OWNED_BY_CSTACK
    },
    co_filename: 112,
    co_name: 128,
    co_firstlineno: 68,
    co_flags: 48,
    co_linetable: 136,
    co_code_adaptive: 200,
    co_firsttraceable: 184,
    table: LineTable::Locations,
    ascii_size: 40,
    compact_size: 56,
    tag_bits: 0,
};
// 3.15 has the 3.14 layout for everything read here (checked against both headers).
#[cfg(Py_3_14)]
const LAYOUT: Layout = Layout {
    tstate_frame: 72,
    via_cframe: None,
    chain: Chain::Interpreter {
        code: 0,
        previous: 8,
        instr: 56,
        owner: 74,
        foreign_owner: 3, // FRAME_OWNED_BY_INTERPRETER, then (3.14) FRAME_OWNED_BY_CSTACK
    },
    co_filename: 112,
    co_name: 128,
    co_firstlineno: 68,
    co_flags: 48,
    co_linetable: 136,
    co_code_adaptive: 208,
    co_firsttraceable: 192,
    table: LineTable::Locations,
    ascii_size: 40,
    compact_size: 56,
    tag_bits: 3,
};

/// `CO_COROUTINE | CO_ITERABLE_COROUTINE | CO_ASYNC_GENERATOR`.
const COROUTINE_FLAGS: u32 = 0x80 | 0x100 | 0x200;
/// `FRAME_OWNED_BY_GENERATOR` (3.11-3.15).
const OWNED_BY_GENERATOR: u8 = 1;
/// `ob_type`, `ob_size` (of a `PyVarObject`), the characters of a `bytes`.
const OB_TYPE: usize = 8;
const OB_SIZE: usize = 16;
const BYTES_DATA: usize = 32;
/// `PyASCIIObject.length` and `.state` (its bit fields: kind, compact, ascii).
const STR_LENGTH: usize = 16;
const STR_STATE: usize = 32;
const STATE_KIND: u32 = 0x1c;
const STATE_COMPACT: u32 = 0x20;
const STATE_ASCII: u32 = 0x40;

/// The most frames, characters and line-table bytes believed: far above real ones, a bound on
/// what a damaged read can make us do.
const MAX_DEPTH: usize = 1024;
const MAX_NAME: usize = 1024;
const MAX_TABLE: usize = 1 << 20;
/// Bytes of a frame object read at once (3.9, 3.10): up to and with `f_lasti`.
const OBJECT_FRAME_HEAD: usize = 112;
/// The most of an `_PyInterpreterFrame`'s head that is read at once (up to its `owner`).
const INTERPRETER_FRAME_HEAD: usize = 80;
/// More references than any live frame object has: a count read as more is not a count.
const MAX_REFS: usize = 1 << 40;

/// The addresses of the types whose objects are read: a read is believed only of an object whose
/// `ob_type` is one of them.
#[derive(Clone, Copy)]
struct Types {
    code: usize,
    unicode: usize,
    bytes: usize,
    frame: usize,
}

/// Why the reader is off in this process, decided once at import; `None` if it is on.
static UNAVAILABLE: OnceLock<Option<&'static str>> = OnceLock::new();
static TYPES: OnceLock<Types> = OnceLock::new();

/// Memory of our own process, read so that an unmapped address is an error, not a fault.
pub(crate) struct Memory {
    pid: i32,
}

#[cfg(target_os = "linux")]
mod sys {
    use std::ffi::{c_ulong, c_void};

    #[repr(C)]
    pub struct IoVec {
        pub base: *mut c_void,
        pub len: usize,
    }

    extern "C" {
        pub fn process_vm_readv(
            pid: i32,
            local: *const IoVec,
            local_count: c_ulong,
            remote: *const IoVec,
            remote_count: c_ulong,
            flags: c_ulong,
        ) -> isize;
        pub fn getpid() -> i32;
    }
}

impl Memory {
    pub(crate) fn new() -> Self {
        #[cfg(target_os = "linux")]
        let pid = unsafe { sys::getpid() };
        #[cfg(not(target_os = "linux"))]
        let pid = 0;
        Memory { pid }
    }

    /// Fills `buf` from `address`, whole or not at all.
    fn read(&self, address: usize, buf: &mut [u8]) -> bool {
        if address == 0 || buf.is_empty() {
            return buf.is_empty();
        }
        #[cfg(target_os = "linux")]
        {
            let local = sys::IoVec {
                base: buf.as_mut_ptr().cast(),
                len: buf.len(),
            };
            let remote = sys::IoVec {
                base: address as *mut _,
                len: buf.len(),
            };
            let read = unsafe {
                sys::process_vm_readv(self.pid, &raw const local, 1, &raw const remote, 1, 0)
            };
            read == buf.len() as isize
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = self.pid;
            false
        }
    }

    pub(crate) fn word(&self, address: usize) -> Option<usize> {
        let mut buf = [0u8; 8];
        self.read(address, &mut buf)
            .then(|| usize::from_ne_bytes(buf))
    }

    fn u32_at(&self, address: usize) -> Option<u32> {
        let mut buf = [0u8; 4];
        self.read(address, &mut buf)
            .then(|| u32::from_ne_bytes(buf))
    }

    fn is_a(&self, object: usize, type_address: usize) -> bool {
        object != 0 && object % 8 == 0 && self.word(object + OB_TYPE) == Some(type_address)
    }

    /// A `str` object's text: only compact strings (every string a code object holds).
    fn string(&self, object: usize, types: &Types) -> Option<String> {
        if !self.is_a(object, types.unicode) {
            return None;
        }
        let length = self.word(object + STR_LENGTH)?;
        let state = self.u32_at(object + STR_STATE)?;
        if length > MAX_NAME || state & STATE_COMPACT == 0 {
            return None;
        }
        if state & STATE_ASCII != 0 {
            let mut buf = vec![0u8; length];
            self.read(object + LAYOUT.ascii_size, &mut buf)
                .then_some(())?;
            return buf.is_ascii().then(|| String::from_utf8(buf).ok())?;
        }
        let kind = ((state & STATE_KIND) >> 2) as usize;
        if !matches!(kind, 1 | 2 | 4) {
            return None;
        }
        let mut buf = vec![0u8; length * kind];
        self.read(object + LAYOUT.compact_size, &mut buf)
            .then_some(())?;
        buf.chunks_exact(kind)
            .map(|unit| {
                let mut code = [0u8; 4];
                code[..kind].copy_from_slice(unit);
                char::from_u32(u32::from_le_bytes(code))
            })
            .collect()
    }

    /// A `bytes` object's content.
    fn bytes(&self, object: usize, types: &Types) -> Option<Vec<u8>> {
        if !self.is_a(object, types.bytes) {
            return None;
        }
        let size = self.word(object + OB_SIZE)?;
        if size > MAX_TABLE {
            return None;
        }
        let mut buf = vec![0u8; size];
        self.read(object + BYTES_DATA, &mut buf).then_some(buf)
    }
}

/// What a code object says about itself, read once per stack.
struct CodeFacts {
    filename: String,
    function: String,
    is_coroutine: bool,
    first_line: i32,
    table: Vec<u8>,
    /// Bytes of instructions (3.11+), to check an instruction pointer against.
    code_bytes: usize,
}

fn code_facts(memory: &Memory, code: usize, types: &Types) -> Option<CodeFacts> {
    if !memory.is_a(code, types.code) {
        return None;
    }
    let filename = memory.string(memory.word(code + LAYOUT.co_filename)?, types)?;
    let function = memory.string(memory.word(code + LAYOUT.co_name)?, types)?;
    let first_line = memory.u32_at(code + LAYOUT.co_firstlineno)? as i32;
    let flags = memory.u32_at(code + LAYOUT.co_flags)?;
    let table = memory.bytes(memory.word(code + LAYOUT.co_linetable)?, types)?;
    let code_bytes = memory.word(code + OB_SIZE)?.saturating_mul(2);
    Some(CodeFacts {
        filename,
        function,
        is_coroutine: flags & COROUTINE_FLAGS != 0,
        first_line,
        table,
        code_bytes,
    })
}

/// One frame found on the chain: its code object and the byte offset of its instruction.
#[derive(Clone, Copy, PartialEq, Eq)]
struct RawFrame {
    /// The frame's own address: the same frame running on between two reads keeps it.
    frame: usize,
    code: usize,
    offset: Option<usize>,
}

/// The chain of frames from the thread state, innermost first; cut where a link does not check out.
fn raw_frames(memory: &Memory, tstate: usize, types: &Types) -> Option<Vec<RawFrame>> {
    let mut frames = Vec::new();
    let mut first_traceable: Vec<(usize, Option<u32>)> = Vec::new();
    let mut at = memory.word(tstate + LAYOUT.tstate_frame)?;
    if let Some(offset) = LAYOUT.via_cframe {
        if at == 0 {
            return Some(frames);
        }
        at = memory.word(at + offset)?;
    }
    // Links followed, not frames kept: a damaged chain can loop through frames that are left out.
    for _ in 0..MAX_DEPTH * 2 {
        if at == 0 || frames.len() >= MAX_DEPTH {
            break;
        }
        if at % 8 != 0 {
            return None;
        }
        match LAYOUT.chain {
            Chain::Objects {
                back,
                code,
                lasti,
                lasti_bytes,
            } => {
                // The frame object's head in one read (a chain that changes while it is followed
                // is read again, so each read is kept short).
                let mut head = [0u8; OBJECT_FRAME_HEAD];
                let span = lasti + 4;
                if span > head.len() || !memory.read(at, &mut head[..span]) {
                    return None;
                }
                let word = |offset: usize| {
                    usize::from_ne_bytes(head[offset..offset + 8].try_into().expect("8 bytes"))
                };
                // A frame object that has been freed keeps its type and code, and its `f_back`
                // becomes the link of the frame free list, which other threads' frames join: only
                // a frame with references is alive (a chain that reaches a dead one is read again).
                let refs = word(0);
                if word(OB_TYPE) != types.frame || refs == 0 || refs >= MAX_REFS {
                    return None;
                }
                let lasti = u32::from_ne_bytes(head[lasti..lasti + 4].try_into().expect("4 bytes"));
                frames.push(RawFrame {
                    frame: at,
                    code: word(code),
                    offset: usize::try_from(lasti as i32).ok().map(|i| i * lasti_bytes),
                });
                at = word(back);
            }
            Chain::Interpreter {
                code,
                previous,
                instr,
                owner,
                foreign_owner,
            } => {
                // The frame's head in one read, as for frame objects above.
                let mut head = [0u8; INTERPRETER_FRAME_HEAD];
                let span = (owner + 1).max(code.max(previous).max(instr) + 8);
                if span > head.len() || !memory.read(at, &mut head[..span]) {
                    return None;
                }
                let word = |offset: usize| {
                    usize::from_ne_bytes(head[offset..offset + 8].try_into().expect("8 bytes"))
                };
                let owned_by = head[owner];
                if owned_by < foreign_owner {
                    let code = word(code) & !LAYOUT.tag_bits;
                    let start = code + LAYOUT.co_code_adaptive;
                    let offset = word(instr).checked_sub(start);
                    // As `_PyFrame_IsIncomplete`: a generator's frame is always complete. A code
                    // pointer that cannot be read (a frame being set up) leaves the frame out;
                    // naming checks the code object anyway. Recursion runs one code object in
                    // many frames: its first traceable instruction is read once per stack.
                    let known = first_traceable.iter().find(|(c, _)| *c == code).copied();
                    let first = if let Some((_, first)) = known {
                        first
                    } else {
                        let first = memory.u32_at(code + LAYOUT.co_firsttraceable);
                        first_traceable.push((code, first));
                        first
                    };
                    let complete = owned_by == OWNED_BY_GENERATOR
                        || matches!((offset, first), (Some(offset), Some(first)) if offset >= first as usize * 2);
                    if complete {
                        frames.push(RawFrame {
                            frame: at,
                            code,
                            offset,
                        });
                    }
                }
                at = word(previous);
            }
        }
    }
    Some(frames)
}

/// Names the frames; a frame whose code does not check out ends the stack there (what lies
/// beyond it cannot be trusted to be this thread's).
fn name_frames(memory: &Memory, raw: &[RawFrame], types: &Types) -> Vec<SampledFrame> {
    let mut facts: HashMap<usize, Option<CodeFacts>> = HashMap::new();
    let mut frames = Vec::with_capacity(raw.len());
    for frame in raw {
        let Some(code) = facts
            .entry(frame.code)
            .or_insert_with(|| code_facts(memory, frame.code, types))
        else {
            break;
        };
        let position = frame
            .offset
            .filter(|&offset| LAYOUT.co_code_adaptive == 0 || offset < code.code_bytes)
            .and_then(|offset| {
                LAYOUT
                    .table
                    .position_at(&code.table, code.first_line, offset)
            });
        frames.push(SampledFrame {
            filename: code.filename.clone(),
            function: code.function.clone(),
            line: position.map(|p| p.line),
            span: position.and_then(|p| p.span),
            is_coroutine: code.is_coroutine,
            still: false,
        });
    }
    frames
}

/// Reads the Python stack of the thread whose `PyThreadState` is at `tstate`, innermost first.
/// The thread may be running: the chain is read twice and only the outer frames that both reads
/// agree on (the same frame running the same code) are kept, with the lines of the second read,
/// so every frame given was on the stack. `None`: the reader is off, or nothing could be read.
/// `activity` says what the OS sees the thread do, where known (see `stands_still`).
pub fn read_stack(tstate: usize, activity: Option<&ThreadActivity>) -> Option<Vec<SampledFrame>> {
    read_frames(tstate, activity, None, true)
}

/// The innermost frame of the thread whose `PyThreadState` is at `tstate`, read as `read_stack`
/// does but without watching whether it stands still: what another thread is running, in a
/// glance (the holder of the GIL, see `gil`).
pub fn innermost_frame(tstate: usize) -> Option<SampledFrame> {
    read_frames(tstate, None, None, false)?.into_iter().next()
}

/// As `read_stack`, only the frames inside `boundary` (the address of a frame further out on the
/// stack: the one a C-implemented loop was called from, which calls each unit from C), innermost
/// first, `boundary` left out. `None` when `boundary` is not among the frames both reads agree
/// on: the stack read is not one of a unit called from there.
pub fn read_stack_within(
    tstate: usize,
    activity: Option<&ThreadActivity>,
    boundary: usize,
) -> Option<Vec<SampledFrame>> {
    read_frames(tstate, activity, Some(boundary), true)
}

fn read_frames(
    tstate: usize,
    activity: Option<&ThreadActivity>,
    boundary: Option<usize>,
    watch_still: bool,
) -> Option<Vec<SampledFrame>> {
    if unavailable().is_some() {
        return None;
    }
    let types = TYPES.get()?;
    let memory = Memory::new();
    // A thread that changes its stack while we read may leave a link that does not check out:
    // that read is dropped and the stack read again, a few times at most.
    (0..READ_ATTEMPTS).find_map(|_| {
        let first = raw_frames(&memory, tstate, types)?;
        let second = raw_frames(&memory, tstate, types)?;
        let common = first
            .iter()
            .rev()
            .zip(second.iter().rev())
            .take_while(|(a, b)| a.frame == b.frame && a.code == b.code)
            .count();
        if common == 0 && !second.is_empty() {
            return None; // not even the outermost frame agreed: read again
        }
        let agreed = second.len() - common;
        let end = match boundary {
            // Innermost first: the frames from the first agreed one to the boundary.
            Some(boundary) => agreed + second[agreed..].iter().position(|f| f.frame == boundary)?,
            None => second.len(),
        };
        let mut named = name_frames(&memory, &second[agreed..end], types);
        if agreed == 0 && watch_still {
            if let Some(innermost) = named.first_mut() {
                innermost.still = stands_still(&memory, tstate, types, second[0], activity);
            }
        }
        match boundary {
            // Every frame inside the boundary named, or none there at all (C code runs).
            Some(_) => (named.len() == end - agreed).then_some(named),
            None => (!named.is_empty() || common == 0).then_some(named),
        }
    })
}

/// How many more times, and how far apart, the innermost frame is read to see it stand still;
/// how many such watches are tried, how far apart, while the thread is kept off the CPU.
const STILL_READS: usize = 4;
const STILL_GAP: std::time::Duration = std::time::Duration::from_micros(20);
const STILL_TRIES: usize = 5;
const STILL_RETRY: std::time::Duration = std::time::Duration::from_millis(1);

/// Whether the innermost frame waits in a call: it stays at `innermost`'s instruction over
/// `STILL_READS` reads `STILL_GAP` apart, and the thread sleeps in the kernel meanwhile (a C call
/// waiting: a sleep, I/O, a lock). A frame only saves its instruction when it calls out, so a
/// Python loop that calls a C function over and over stands still at that call as a long C call
/// does: a thread that stands still using the CPU is not said to wait (the report blames the
/// calling line, not the C function). A thread kept off the CPU proves nothing: its watch is tried
/// again a little later, and if every one is spoiled so, the answer is no. Without `activity`
/// (the OS does not say) standing still is taken as waiting.
fn stands_still(
    memory: &Memory,
    tstate: usize,
    types: &Types,
    innermost: RawFrame,
    activity: Option<&ThreadActivity>,
) -> bool {
    let window_ns = (STILL_GAP * STILL_READS as u32).as_nanos() as u64;
    for attempt in 0..STILL_TRIES {
        if attempt > 0 {
            std::thread::sleep(STILL_RETRY);
        }
        let before = activity.and_then(ThreadActivity::cpu_ns);
        let still = (0..STILL_READS).all(|_| {
            let until = std::time::Instant::now() + STILL_GAP;
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
            raw_frames(memory, tstate, types).and_then(|frames| frames.first().copied())
                == Some(innermost)
        });
        if !still {
            return false;
        }
        let Some(activity) = activity else {
            return true;
        };
        let ran = match (before, activity.cpu_ns()) {
            (Some(before), Some(after)) => after.saturating_sub(before),
            _ => return true,
        };
        if ran >= window_ns / 2 {
            return false; // computing: one C call, or Python calling C again and again
        }
        if activity.sleeping() == Some(true) {
            return true;
        }
    }
    false
}

/// How many times `read_stack` reads a changing stack before it gives up.
const READ_ATTEMPTS: usize = 8;

/// The calling thread's `PyThreadState`, as `read_stack` takes it.
pub fn current_thread_state() -> usize {
    unsafe { ffi::PyThreadState_Get() as usize }
}

/// `None` when stacks can be read, else why not (also before `init` has decided).
pub fn unavailable() -> Option<&'static str> {
    UNAVAILABLE
        .get()
        .copied()
        .unwrap_or(Some("not checked yet"))
}

/// Decides at import whether the reader can be trusted: it must read the importing thread's
/// stack exactly as the interpreter gives it (file, function and line of every frame).
pub fn init(py: Python<'_>) {
    let _ = TYPES.set({
        Types {
            code: std::ptr::addr_of_mut!(ffi::PyCode_Type) as usize,
            unicode: std::ptr::addr_of_mut!(ffi::PyUnicode_Type) as usize,
            bytes: std::ptr::addr_of_mut!(ffi::PyBytes_Type) as usize,
            frame: std::ptr::addr_of_mut!(ffi::PyFrame_Type) as usize,
        }
    });
    let reason = if !cfg!(all(target_os = "linux", target_pointer_width = "64")) {
        Some("reading another thread's stack is implemented on 64-bit Linux only")
    } else if cfg!(Py_3_16) || cfg!(Py_GIL_DISABLED) {
        Some("the frame layout of this CPython build was not read")
    } else if std::env::var_os("LOOPWATCH_NO_STACK_READS").is_some() {
        Some("LOOPWATCH_NO_STACK_READS is set")
    } else {
        match own_stack_agrees(py) {
            Ok(true) => None,
            Ok(false) => Some("the frame layout of this CPython build did not check out"),
            Err(()) => Some("process_vm_readv is not permitted here"),
        }
    };
    let _ = UNAVAILABLE.set(reason);
}

/// The calling thread's stack as the interpreter gives it: (file, function, line), innermost first.
fn interpreter_stack(py: Python<'_>) -> PyResult<Vec<(String, String, Option<u32>)>> {
    let mut stack = Vec::new();
    let mut frame = unsafe { ffi::PyEval_GetFrame() };
    if !frame.is_null() {
        unsafe { ffi::Py_INCREF(frame.cast()) };
    }
    while !frame.is_null() {
        unsafe {
            let code = Bound::from_owned_ptr(py, ffi::PyFrame_GetCode(frame).cast());
            let name = if cfg!(Py_3_11) {
                "co_qualname"
            } else {
                "co_name"
            };
            let line = ffi::PyFrame_GetLineNumber(frame);
            stack.push((
                code.getattr("co_filename")?.extract()?,
                code.getattr(name)?.extract()?,
                u32::try_from(line).ok().filter(|&l| l > 0),
            ));
            let back = ffi::PyFrame_GetBack(frame);
            ffi::Py_DECREF(frame.cast());
            frame = back;
        }
    }
    Ok(stack)
}

/// `Err` when memory cannot be read at all; else whether the reader agrees with the interpreter.
fn own_stack_agrees(py: Python<'_>) -> Result<bool, ()> {
    let memory = Memory::new();
    let mut probe = [0u8; 8];
    let here = std::ptr::addr_of!(probe) as usize;
    if !memory.read(here, &mut probe) {
        return Err(());
    }
    let Ok(expected) = interpreter_stack(py) else {
        return Ok(false);
    };
    let Some(types) = TYPES.get() else {
        return Ok(false);
    };
    let read = raw_frames(&memory, current_thread_state(), types)
        .map(|raw| name_frames(&memory, &raw, types));
    let Some(read) = read else {
        return Ok(false);
    };
    let read: Vec<(String, String, Option<u32>)> = read
        .into_iter()
        .map(|f| (f.filename, f.function, f.line))
        .collect();
    Ok(!expected.is_empty() && read == expected)
}

/// A frame as Python sees it (`_read_stack`, the always-on mode's naming): (filename, function,
/// line, the span `(end_line, col, end_col)` of what it runs, whether it is a coroutine's, and
/// whether it waited in a call (the innermost only)).
pub type FrameTuple = (
    String,
    String,
    Option<u32>,
    Option<(u32, u32, u32)>,
    bool,
    bool,
);

pub fn frame_to_tuple(f: &SampledFrame) -> FrameTuple {
    (
        f.filename.clone(),
        f.function.clone(),
        f.line,
        f.span.map(|s| (s.end_line, s.col, s.end_col)),
        f.is_coroutine,
        f.still,
    )
}

#[cfg(Py_3_11)] // the always-on mode's
pub fn frame_from_tuple(
    (filename, function, line, span, is_coroutine, still): FrameTuple,
) -> SampledFrame {
    SampledFrame {
        filename,
        function,
        line,
        span: span.map(|(end_line, col, end_col)| loopwatch_core::Span {
            end_line,
            col,
            end_col,
        }),
        is_coroutine,
        still,
    }
}

/// For tests and diagnostics: the calling thread's stack read as the watchdog reads it,
/// innermost first, or, with `tstate`, another thread's, read with the GIL released. `None` when
/// the reader is off.
#[pyfunction]
#[pyo3(signature = (tstate=None, details=false))]
pub fn _read_stack(
    py: Python<'_>,
    tstate: Option<usize>,
    details: bool,
) -> Option<Vec<Bound<'_, PyAny>>> {
    let frames = match tstate {
        None => read_stack(current_thread_state(), None),
        Some(tstate) => py.detach(|| read_stack(tstate, None)),
    }?;
    frames
        .iter()
        .map(|f| {
            let full = frame_to_tuple(f);
            if details {
                full.into_pyobject(py).map(Bound::into_any)
            } else {
                (full.0, full.1, full.2)
                    .into_pyobject(py)
                    .map(Bound::into_any)
            }
        })
        .collect::<PyResult<Vec<_>>>()
        .ok()
}

/// For tests: the calling thread's `PyThreadState` address, for `_read_stack`, and why the
/// reader is off (or None).
#[pyfunction]
pub fn _stack_reads() -> (usize, Option<&'static str>) {
    (current_thread_state(), unavailable())
}
