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
