//! How long the calling thread has waited, ready to run, for a CPU: on Linux the run-queue
//! wait the scheduler keeps per thread (`/proc/thread-self/schedstat`, second field, in ns).
//! Elsewhere the OS does not say, and nothing is taken off an episode.

/// The calling thread's cumulative wait for a CPU in nanoseconds, or `None` where unknown.
#[cfg(target_os = "linux")]
pub fn thread_cpu_wait_ns() -> Option<u64> {
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    use std::cell::RefCell;

    thread_local! {
        // Opened once per thread and process: `thread-self` is resolved at open, to the opening
        // thread, so the child of a fork opens its own (the parent's file would tell the
        // parent's wait).
        static SCHEDSTAT: RefCell<Option<(u32, Option<File>)>> = const { RefCell::new(None) };
    }
    let pid = std::process::id();
    SCHEDSTAT.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(opened_by, _)| *opened_by != pid) {
            *slot = Some((pid, File::open("/proc/thread-self/schedstat").ok()));
        }
        let mut text = [0u8; 96];
        let read = slot.as_ref()?.1.as_ref()?.read_at(&mut text, 0).ok()?;
        parse_schedstat(&text[..read])
    })
}

#[cfg(not(target_os = "linux"))]
pub fn thread_cpu_wait_ns() -> Option<u64> {
    None
}

/// Another thread's run-queue wait, read from a thread that watches it (the watchdog): the file
/// of the thread with kernel id `tid`, opened once.
pub struct OtherThreadCpuWait {
    #[cfg(target_os = "linux")]
    file: Option<std::fs::File>,
}

impl OtherThreadCpuWait {
    pub fn open(tid: i64) -> Self {
        #[cfg(target_os = "linux")]
        {
            let path = format!("/proc/self/task/{tid}/schedstat");
            Self {
                file: std::fs::File::open(path).ok(),
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = tid;
            Self {}
        }
    }

    /// The thread's cumulative wait for a CPU in nanoseconds, or `None` where unknown (also once
    /// the thread has ended).
    pub fn wait_ns(&self) -> Option<u64> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::FileExt;
            let mut text = [0u8; 96];
            let read = self.file.as_ref()?.read_at(&mut text, 0).ok()?;
            parse_schedstat(&text[..read])
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }
}

/// What the OS says another thread of this process is doing now: how much CPU it has used, to
/// the nanosecond and up to date even while it runs (its CPU-time clock), and whether it sleeps
/// in the kernel (a blocking call) rather than runs or waits for a CPU. Linux only; elsewhere
/// every answer is `None`.
pub struct ThreadActivity {
    #[cfg(target_os = "linux")]
    clock: i32,
    #[cfg(target_os = "linux")]
    stat: Option<std::fs::File>,
}

impl ThreadActivity {
    pub fn open(tid: i64) -> Self {
        #[cfg(target_os = "linux")]
        {
            // The kernel's clock id for one thread's CPU time (what glibc's
            // `pthread_getcpuclockid` makes): the thread id inverted, then the per-thread bit and
            // the scheduler clock.
            let clock = i32::try_from(tid).map_or(0, |tid| (!tid << 3) | 4 | 2);
            Self {
                clock,
                stat: std::fs::File::open(format!("/proc/self/task/{tid}/stat")).ok(),
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = tid;
            Self {}
        }
    }

    /// The CPU time the thread has used, in ns.
    pub fn cpu_ns(&self) -> Option<u64> {
        #[cfg(target_os = "linux")]
        {
            #[repr(C)]
            struct Timespec {
                sec: i64,
                nsec: i64,
            }
            extern "C" {
                fn clock_gettime(clock: i32, time: *mut Timespec) -> i32;
            }
            if self.clock == 0 {
                return None;
            }
            let mut time = Timespec { sec: 0, nsec: 0 };
            if unsafe { clock_gettime(self.clock, &raw mut time) } != 0 {
                return None;
            }
            u64::try_from(time.sec)
                .ok()?
                .checked_mul(1_000_000_000)?
                .checked_add(u64::try_from(time.nsec).ok()?)
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }

    /// Whether the thread sleeps in the kernel now (state `S` or `D`): it waits in a blocking
    /// call, it neither runs nor waits for a CPU.
    pub fn sleeping(&self) -> Option<bool> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::FileExt;
            let mut text = [0u8; 512];
            let read = self.stat.as_ref()?.read_at(&mut text, 0).ok()?;
            parse_stat_state(&text[..read]).map(|state| matches!(state, b'S' | b'D'))
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }
}

/// The state letter out of a `/proc/<pid>/task/<tid>/stat` line: `<tid> (<name>) <state> ...`,
/// where the name may itself hold spaces and parentheses (so the last `)` ends it).
pub fn parse_stat_state(text: &[u8]) -> Option<u8> {
    let name_end = text.iter().rposition(|&b| b == b')')?;
    text.get(name_end + 2).copied()
}

/// What `/proc/<pid>/task/<tid>/syscall` says a thread is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syscall {
    /// It runs, or waits for a CPU.
    Running,
    /// It is blocked in system call `number` (`u64::MAX`: blocked outside one), whose first
    /// argument is `first_arg`.
    Call { number: u64, first_arg: u64 },
}

/// Reads a `syscall` line: `running`, `<number> <arg1> ... <sp> <pc>` (hexadecimal arguments), or
/// `-1 <sp> <pc>` for a thread blocked outside a system call.
pub fn parse_syscall(text: &[u8]) -> Option<Syscall> {
    let text = std::str::from_utf8(text).ok()?;
    let mut fields = text.split_ascii_whitespace();
    let first = fields.next()?;
    if first == "running" {
        return Some(Syscall::Running);
    }
    let number = if first == "-1" {
        u64::MAX
    } else {
        first.parse().ok()?
    };
    let arg = fields.next()?;
    let first_arg = u64::from_str_radix(arg.strip_prefix("0x")?, 16).ok()?;
    Some(Syscall::Call { number, first_arg })
}

/// The run-queue wait out of a `schedstat` line: `<on-cpu ns> <waiting ns> <timeslices>`.
pub fn parse_schedstat(text: &[u8]) -> Option<u64> {
    std::str::from_utf8(text)
        .ok()?
        .split_ascii_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_second_field() {
        assert_eq!(parse_schedstat(b"19529712 52980 17\n"), Some(52980));
        assert_eq!(parse_schedstat(b"19529712\n"), None);
        assert_eq!(parse_schedstat(b"1 x 2\n"), None);
        assert_eq!(parse_schedstat(b""), None);
    }

    #[test]
    fn reads_what_a_thread_is_blocked_in() {
        assert_eq!(parse_syscall(b"running\n"), Some(Syscall::Running));
        assert_eq!(
            parse_syscall(b"202 0x7fc943c56204 0x89 0x0 0x7fc9428dbbf0 0x0 0xffffffff 0x7fc9428dbac0 0x7fc9434a3f16\n"),
            Some(Syscall::Call {
                number: 202,
                first_arg: 0x7fc9_43c5_6204
            })
        );
        assert_eq!(
            parse_syscall(b"-1 0x7ffc1 0x7f2\n"),
            Some(Syscall::Call {
                number: u64::MAX,
                first_arg: 0x7ffc1
            })
        );
        assert_eq!(parse_syscall(b""), None);
        assert_eq!(parse_syscall(b"202 zz"), None);
    }

    #[test]
    fn reads_the_state_after_the_name_whatever_the_name_holds() {
        assert_eq!(parse_stat_state(b"4242 (python3) S 1 2 3"), Some(b'S'));
        assert_eq!(parse_stat_state(b"4242 (a) b) (c) R 1 2"), Some(b'R'));
        assert_eq!(parse_stat_state(b"4242 (cut"), None);
        assert_eq!(parse_stat_state(b"4242 (x)"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn another_thread_is_seen_using_the_cpu_or_sleeping() {
        fn tid() -> i64 {
            extern "C" {
                fn gettid() -> i32;
            }
            i64::from(unsafe { gettid() })
        }
        let (sender, receiver) = std::sync::mpsc::channel();
        let spinner = std::thread::spawn(move || {
            sender.send(tid()).unwrap();
            let started = std::time::Instant::now();
            while started.elapsed() < std::time::Duration::from_millis(300) {
                std::hint::black_box(0);
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
        });
        let activity = ThreadActivity::open(receiver.recv().unwrap());
        let before = activity.cpu_ns().expect("a thread's CPU clock is readable");
        std::thread::sleep(std::time::Duration::from_millis(100));
        let after = activity.cpu_ns().unwrap();
        // It spun for most of those 100 ms, however busy the machine.
        assert!(after - before > 10_000_000, "{before} -> {after}");
        assert_eq!(activity.sleeping(), Some(false));
        std::thread::sleep(std::time::Duration::from_millis(350));
        assert_eq!(activity.sleeping(), Some(true));
        spinner.join().unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_that_waits_for_a_cpu_is_seen_waiting() {
        // More busy threads than CPUs: each has to wait for one at some point.
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let waits: Vec<(u64, u64)> = std::thread::scope(|scope| {
            let busy: Vec<_> = (0..cpus * 3)
                .map(|_| {
                    scope.spawn(|| {
                        let before = thread_cpu_wait_ns().expect("schedstat is readable");
                        let started = std::time::Instant::now();
                        while started.elapsed() < std::time::Duration::from_millis(200) {
                            std::hint::black_box(0);
                        }
                        (before, thread_cpu_wait_ns().expect("schedstat is readable"))
                    })
                })
                .collect();
            busy.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(waits.iter().all(|(before, after)| after >= before));
        assert!(waits
            .iter()
            .any(|(before, after)| after - before > 1_000_000));
    }
}
