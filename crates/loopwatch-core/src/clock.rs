//! The clock the hook reads on every call and return: a raw counter (the TSC where it is invariant,
//! the monotonic clock elsewhere) that is only turned into nanoseconds on the slow path.

use crate::tracker::Ticks;

/// A calibrated raw clock. Reading it costs a few nanoseconds; converting is done only for reports.
#[derive(Clone)]
pub struct Clock {
    inner: quanta::Clock,
    nanos_per_tick: f64,
}

impl Clock {
    /// Calibrates the counter against the monotonic clock (a few milliseconds, once per process).
    pub fn new() -> Self {
        let inner = quanta::Clock::new();
        // quanta converts deltas with a fixed scale; read it off a large span to keep precision.
        let span: u64 = 1 << 40;
        let nanos_per_tick = inner.delta_as_nanos(0, span) as f64 / span as f64;
        Self {
            inner,
            nanos_per_tick,
        }
    }

    #[inline]
    pub fn now(&self) -> Ticks {
        self.inner.raw()
    }

    pub fn nanos_per_tick(&self) -> f64 {
        self.nanos_per_tick
    }

    /// The number of ticks in `nanos`, rounded up so that a threshold is never undercut.
    pub fn ticks_for_nanos(&self, nanos: f64) -> Ticks {
        (nanos / self.nanos_per_tick).ceil() as Ticks
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_measures_a_sleep_within_a_few_percent() {
        let clock = Clock::new();
        let start = clock.now();
        let wall = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let ticks = clock.now() - start;
        let wall_ns = wall.elapsed().as_nanos() as f64;
        let measured_ns = ticks as f64 * clock.nanos_per_tick();
        assert!(
            (measured_ns / wall_ns - 1.0).abs() < 0.05,
            "{measured_ns} vs {wall_ns}"
        );
    }

    #[test]
    fn threshold_in_ticks_is_never_shorter_than_asked() {
        let clock = Clock::new();
        let ticks = clock.ticks_for_nanos(10_000_000.0);
        assert!(ticks as f64 * clock.nanos_per_tick() >= 10_000_000.0 - 1e-6);
    }
}
