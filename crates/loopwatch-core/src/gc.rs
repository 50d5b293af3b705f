//! Garbage-collection pauses of one thread: when each collection it ran started and stopped, on
//! the hook's clock, so that the time a collection held the loop is told apart from the time of
//! the code it interrupted. The binding feeds it from `gc.callbacks` (start and stop of each
//! collection, on the thread that collects); the tracker asks how much of a frame's time was a
//! collection, on the slow path only.

use std::cell::RefCell;
use std::collections::VecDeque;

use crate::tracker::Ticks;

/// How many of a thread's latest collections are kept. Young collections come every few hundred
/// allocations, so a step that runs long enough to make more than this many has its oldest ones
/// forgotten: their time is then counted as the code's (see `GcLog::within`).
pub const GC_LOG_CAPACITY: usize = 1024;

/// One finished collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcPause {
    pub start: Ticks,
    pub end: Ticks,
    pub generation: u8,
}

/// How much of an interval collections took, and the oldest generation among them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcTime {
    pub ticks: Ticks,
    /// The oldest generation collected; `None` when no collection overlapped.
    pub generation: Option<u8>,
}

/// A thread's latest collections, oldest first, and the one running now.
#[derive(Debug, Default)]
pub struct GcLog {
    pauses: VecDeque<GcPause>,
    running: Option<(Ticks, u8)>,
}

impl GcLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// A collection of `generation` starts.
    pub fn start(&mut self, now: Ticks, generation: u8) {
        self.running = Some((now, generation));
    }

    /// The running collection stops. A stop with no start (the callback was added while a
    /// collection ran) is ignored.
    pub fn stop(&mut self, now: Ticks) {
        let Some((start, generation)) = self.running.take() else {
            return;
        };
        if self.pauses.len() == GC_LOG_CAPACITY {
            self.pauses.pop_front();
        }
        self.pauses.push_back(GcPause {
            start,
            end: now.max(start),
            generation,
        });
    }

    /// How much of `[from, to)` collections took, a running one counted up to `to`.
    pub fn within(&self, from: Ticks, to: Ticks) -> GcTime {
        let mut time = GcTime::default();
        let mut add = |start: Ticks, end: Ticks, generation: u8| {
            let overlap = end.min(to).saturating_sub(start.max(from));
            if overlap > 0 {
                time.ticks += overlap;
                time.generation = time.generation.max(Some(generation));
            }
        };
        // Newest first: stop at the first collection that ended before the interval.
        for pause in self.pauses.iter().rev() {
            if pause.end <= from {
                break;
            }
            add(pause.start, pause.end, pause.generation);
        }
        if let Some((start, generation)) = self.running {
            add(start, to, generation);
        }
        time
    }

    /// Forgets everything (the child of a fork starts afresh).
    pub fn clear(&mut self) {
        self.pauses.clear();
        self.running = None;
    }
}

thread_local! {
    static THREAD_GC_LOG: RefCell<GcLog> = RefCell::new(GcLog::new());
}

/// The calling thread starts a collection of `generation`.
pub fn thread_gc_start(now: Ticks, generation: u8) {
    THREAD_GC_LOG.with(|log| log.borrow_mut().start(now, generation));
}

/// The calling thread's collection stops.
pub fn thread_gc_stop(now: Ticks) {
    THREAD_GC_LOG.with(|log| log.borrow_mut().stop(now));
}

/// How much of `[from, to)` the calling thread spent collecting.
pub fn thread_gc_within(from: Ticks, to: Ticks) -> GcTime {
    THREAD_GC_LOG.with(|log| log.borrow().within(from, to))
}

/// Forgets the calling thread's collections.
pub fn thread_gc_clear() {
    THREAD_GC_LOG.with(|log| log.borrow_mut().clear());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_overlap_with_the_interval_counts() {
        let mut log = GcLog::new();
        log.start(10, 0);
        log.stop(20);
        log.start(40, 2);
        log.stop(100);
        assert_eq!(log.within(0, 10), GcTime::default());
        assert_eq!(
            log.within(15, 50),
            GcTime {
                ticks: 5 + 10,
                generation: Some(2)
            }
        );
        assert_eq!(
            log.within(0, 30),
            GcTime {
                ticks: 10,
                generation: Some(0)
            }
        );
        assert_eq!(log.within(100, 200), GcTime::default());
    }

    #[test]
    fn a_running_collection_counts_up_to_the_end_of_the_interval() {
        let mut log = GcLog::new();
        log.start(50, 1);
        assert_eq!(
            log.within(0, 80),
            GcTime {
                ticks: 30,
                generation: Some(1)
            }
        );
    }

    #[test]
    fn a_stop_without_a_start_is_ignored() {
        let mut log = GcLog::new();
        log.stop(10);
        assert_eq!(log.within(0, 100), GcTime::default());
    }

    #[test]
    fn only_the_latest_collections_are_kept() {
        let mut log = GcLog::new();
        for n in 0..(GC_LOG_CAPACITY as u64 + 10) {
            log.start(n * 10, 0);
            log.stop(n * 10 + 1);
        }
        assert_eq!(log.within(0, u64::MAX).ticks, GC_LOG_CAPACITY as u64);
    }

    #[test]
    fn each_thread_has_a_log_of_its_own() {
        thread_gc_start(0, 2);
        thread_gc_stop(30);
        assert_eq!(thread_gc_within(0, 100).ticks, 30);
        let other = std::thread::spawn(|| thread_gc_within(0, 100))
            .join()
            .unwrap();
        assert_eq!(other, GcTime::default());
        thread_gc_clear();
        assert_eq!(thread_gc_within(0, 100), GcTime::default());
    }
}
