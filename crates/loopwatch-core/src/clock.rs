//! The clock the hook reads on every call and return: the CPU's time-stamp counter where it ticks
//! at a constant rate, the monotonic clock elsewhere. Ticks become nanoseconds only on the slow path.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::tracker::Ticks;

/// A calibrated raw clock: a copyable pair of "which counter" and "how long one tick is".
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    tsc: bool,
    nanos_per_tick: f64,
}

/// The monotonic fallback counts nanoseconds from this process-wide origin.
static ORIGIN: OnceLock<Instant> = OnceLock::new();
static CALIBRATED: OnceLock<Clock> = OnceLock::new();

/// Long enough that the error of the two paired readings (tens of ns) stays below 1e-5.
const CALIBRATION_SPAN: Duration = Duration::from_millis(5);

impl Clock {
    /// The process-wide clock. The first call calibrates the counter (about 5 ms).
    pub fn new() -> Self {
        *CALIBRATED.get_or_init(|| {
            ORIGIN.get_or_init(Instant::now);
            if invariant_tsc() {
                Self {
                    tsc: true,
                    nanos_per_tick: calibrate_tsc(),
                }
            } else {
                Self::monotonic()
            }
        })
    }

    /// The portable clock: nanoseconds since the process-wide origin.
    pub fn monotonic() -> Self {
        ORIGIN.get_or_init(Instant::now);
        Self {
            tsc: false,
            nanos_per_tick: 1.0,
        }
    }

    /// The time-stamp counter, if this clock reads it: one instruction, no call.
    #[inline(always)]
    pub fn counter_now(&self) -> Option<Ticks> {
        #[cfg(target_arch = "x86_64")]
        if self.tsc {
            // SAFETY: only chosen when CPUID reported the instruction (see `invariant_tsc`).
            return Some(unsafe { std::arch::x86_64::_rdtsc() });
        }
        None
    }

    #[inline(always)]
    pub fn now(&self) -> Ticks {
        self.counter_now().unwrap_or_else(monotonic_nanos)
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

#[cold]
fn monotonic_nanos() -> Ticks {
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as Ticks
}

/// The TSC is usable as a clock only if it ticks at a constant rate through frequency changes
/// and sleep states (CPUID leaf `0x8000_0007`, EDX bit 8); otherwise its ticks are not time.
fn invariant_tsc() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // `unsafe` for toolchains before CPUID became a safe intrinsic (Rust 1.87).
        #[allow(unused_unsafe)]
        unsafe {
            __cpuid(0x8000_0000).eax >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Nanoseconds per TSC tick, measured against the monotonic clock over `CALIBRATION_SPAN`.
#[cfg(target_arch = "x86_64")]
fn calibrate_tsc() -> f64 {
    let (tsc_start, wall_start) = paired_reading();
    while wall_start.elapsed() < CALIBRATION_SPAN {
        std::hint::spin_loop();
    }
    let (tsc_end, wall_end) = paired_reading();
    let nanos = wall_end.duration_since(wall_start).as_nanos() as f64;
    nanos / tsc_end.saturating_sub(tsc_start).max(1) as f64
}

#[cfg(not(target_arch = "x86_64"))]
fn calibrate_tsc() -> f64 {
    1.0
}

/// A TSC reading and an `Instant` taken as close together as we can: the tightest bracket of
/// a few tries, with the TSC value at the bracket's middle.
#[cfg(target_arch = "x86_64")]
fn paired_reading() -> (Ticks, Instant) {
    use std::arch::x86_64::_rdtsc;
    let mut best: Option<(u64, Ticks, Instant)> = None;
    for _ in 0..7 {
        // SAFETY: called only after `invariant_tsc` found the instruction.
        let before = unsafe { _rdtsc() };
        let wall = Instant::now();
        let after = unsafe { _rdtsc() };
        let width = after.saturating_sub(before);
        if best.is_none_or(|(best_width, _, _)| width < best_width) {
            best = Some((width, before + width / 2, wall));
        }
    }
    let (_, tsc, wall) = best.expect("at least one reading");
    (tsc, wall)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measures_a_sleep_within_a_few_percent(clock: Clock) {
        let start = clock.now();
        let wall = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let ticks = clock.now() - start;
        let wall_ns = wall.elapsed().as_nanos() as f64;
        let measured_ns = ticks as f64 * clock.nanos_per_tick();
        assert!(
            (measured_ns / wall_ns - 1.0).abs() < 0.05,
            "{measured_ns} vs {wall_ns}"
        );
    }

    #[test]
    fn the_default_clock_measures_a_sleep_within_a_few_percent() {
        measures_a_sleep_within_a_few_percent(Clock::new());
    }

    #[test]
    fn the_monotonic_fallback_measures_a_sleep_within_a_few_percent() {
        measures_a_sleep_within_a_few_percent(Clock::monotonic());
    }

    #[test]
    fn threshold_in_ticks_is_never_shorter_than_asked() {
        let clock = Clock::new();
        let ticks = clock.ticks_for_nanos(10_000_000.0);
        assert!(ticks as f64 * clock.nanos_per_tick() >= 10_000_000.0 - 1e-6);
    }
}
