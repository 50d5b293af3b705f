//! Waits for the GIL of one watched thread: when the loop's thread sleeps until another thread
//! gives the GIL back, the time is not its code's. The watchdog looks at the thread about once a
//! millisecond while other threads take the GIL (see the binding's `gil` module); each look says
//! how much CPU the thread has used and how long it has waited for a CPU so far (both exact, from
//! the OS), and whether it sleeps waiting for the GIL, runs, or sleeps on something else. Between
//! two looks the thread slept for exactly the time that is neither: when one of the two looks saw
//! it wait for the GIL and neither saw it sleep on anything else, that sleep is taken as the wait
//! for the GIL. The tracker asks how much of a frame's time such waits took, on the slow path.

use std::collections::VecDeque;

use crate::episode::{gc_culprit_name, EpisodeKind, GilHolder, StackFrame};
use crate::tracker::Ticks;

/// How many of a thread's latest waits are kept (each is a run of looks with one holder).
pub const GIL_LOG_CAPACITY: usize = 1024;

/// What a look saw the thread do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doing {
    /// It slept waiting for the GIL, held by the thread `holder` (its `threading` ident; 0 when
    /// it could not be read).
    Gil { holder: u64 },
    /// It ran, or waited for a CPU.
    Running,
    /// It slept in some other call (I/O, `time.sleep`, a lock): its code's time.
    Sleeping,
}

/// One look at the thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GilLook {
    pub at: Ticks,
    /// The CPU time the thread has used so far, ns.
    pub cpu_ns: u64,
    /// How long it has waited for a CPU so far, ns.
    pub cpu_wait_ns: u64,
    pub doing: Doing,
}

/// How long the thread waited for the GIL between looks `a` and `b` (ns), and the holder it
/// waited on; `None` when the stretch cannot be told to be a wait for the GIL.
pub fn waited_between(a: &GilLook, b: &GilLook, nanos_per_tick: f64) -> Option<(u64, u64)> {
    let holder = match (a.doing, b.doing) {
        // A holder that could not be told (0) gives way to one that could.
        (Doing::Gil { holder: first }, Doing::Gil { holder: then }) => {
            if first == 0 {
                then
            } else {
                first
            }
        }
        (Doing::Gil { holder }, Doing::Running) | (Doing::Running, Doing::Gil { holder }) => holder,
        _ => return None,
    };
    let wall_ns = (b.at.saturating_sub(a.at) as f64 * nanos_per_tick) as u64;
    let slept = wall_ns
        .saturating_sub(b.cpu_ns.saturating_sub(a.cpu_ns))
        .saturating_sub(b.cpu_wait_ns.saturating_sub(a.cpu_wait_ns));
    (slept > 0).then_some((slept, holder))
}

/// One stretch of waiting for the GIL: `waited` ticks of it fell between `start` and `end`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GilWait {
    pub start: Ticks,
    pub end: Ticks,
    pub waited: Ticks,
    pub holder: u64,
    /// What the holder was running when the watchdog read its stack, if it could.
    pub holder_running: Option<String>,
}

/// How much of an interval waits for the GIL took, and who held it, longest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GilTime {
    pub ticks: Ticks,
    pub holders: Vec<HeldBy>,
}

/// One thread that held the GIL while the loop's thread waited for it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeldBy {
    /// Its `threading` ident, 0 when unknown.
    pub ident: u64,
    pub ticks: Ticks,
    pub running: Option<String>,
}

/// A thread's latest waits for the GIL, oldest first.
#[derive(Debug, Default)]
pub struct GilLog {
    waits: VecDeque<GilWait>,
}

impl GilLog {
    pub const fn new() -> Self {
        GilLog {
            waits: VecDeque::new(),
        }
    }

    /// Adds a wait; one that goes on from the latest, with the same holder, lengthens it.
    pub fn add(&mut self, wait: GilWait) {
        if let Some(last) = self.waits.back_mut() {
            if last.end == wait.start && last.holder == wait.holder {
                last.end = wait.end;
                last.waited += wait.waited;
                if wait.holder_running.is_some() {
                    last.holder_running = wait.holder_running;
                }
                return;
            }
        }
        if self.waits.len() == GIL_LOG_CAPACITY {
            self.waits.pop_front();
        }
        self.waits.push_back(wait);
    }

    /// How much of `[from, to)` the thread waited for the GIL: a wait that lies partly inside
    /// counts in proportion.
    pub fn within(&self, from: Ticks, to: Ticks) -> GilTime {
        let mut time = GilTime::default();
        for wait in self.waits.iter().rev() {
            if wait.end <= from {
                break;
            }
            let span = wait.end.saturating_sub(wait.start);
            let overlap = wait.end.min(to).saturating_sub(wait.start.max(from));
            if overlap == 0 || span == 0 {
                continue;
            }
            let ticks = if overlap >= span {
                wait.waited
            } else {
                (u128::from(wait.waited) * u128::from(overlap) / u128::from(span)) as Ticks
            };
            if ticks == 0 {
                continue;
            }
            time.ticks += ticks;
            match time.holders.iter_mut().find(|h| h.ident == wait.holder) {
                Some(held) => {
                    held.ticks += ticks;
                    if held.running.is_none() {
                        held.running.clone_from(&wait.holder_running);
                    }
                }
                None => time.holders.push(HeldBy {
                    ident: wait.holder,
                    ticks,
                    running: wait.holder_running.clone(),
                }),
            }
        }
        time.holders
            .sort_by_key(|held| std::cmp::Reverse(held.ticks));
        time
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.waits.clear();
    }
}

/// What a unit over the threshold waited on that is not its code: `None` when its code is to
/// blame (over the threshold without the waits) or when it is over the threshold only for want of
/// a CPU (starved, judged as such elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotTheCode {
    /// Mostly garbage collections.
    Gc,
    /// Mostly waiting for the GIL.
    Gil,
}

/// Whether a callback or step of `duration_ns`, of which the thread waited `cpu_wait_ns` for a
/// CPU, spent `gc_ns` in collections and waited `gil_ns` for the GIL, is over the threshold only
/// because of the collections and the waits for the GIL; if so, which took longer.
pub fn not_the_code(
    duration_ns: u64,
    cpu_wait_ns: u64,
    gc_ns: u64,
    gil_ns: u64,
    threshold_ns: u64,
) -> Option<NotTheCode> {
    let own_ns = duration_ns.saturating_sub(cpu_wait_ns);
    let code_ns = own_ns.saturating_sub(gc_ns).saturating_sub(gil_ns);
    if gc_ns + gil_ns == 0 || own_ns < threshold_ns || code_ns >= threshold_ns {
        return None;
    }
    Some(if gil_ns > gc_ns {
        NotTheCode::Gil
    } else {
        NotTheCode::Gc
    })
}

/// The report's holders of the GIL: `time`'s, each named (`names`, in the same order), with its
/// wait in ns.
pub fn gil_holders(
    time: &GilTime,
    names: &[Option<String>],
    nanos_per_tick: f64,
) -> Vec<GilHolder> {
    time.holders
        .iter()
        .enumerate()
        .map(|(i, held)| GilHolder {
            thread_id: held.ident,
            thread_name: names.get(i).cloned().flatten(),
            wait_ns: (held.ticks as f64 * nanos_per_tick).round() as u64,
            running: held.running.clone(),
        })
        .collect()
}

/// The name a wait for the GIL is reported under, as a culprit: the thread that held it longest,
/// and how many others did. Kept short and steady (metrics label by it): what each holder was
/// running is in the report's holders.
pub fn gil_culprit_name(holders: &[GilHolder]) -> String {
    let Some(first) = holders.first() else {
        return "waiting for the GIL".to_owned();
    };
    let thread = match &first.thread_name {
        Some(name) => format!("thread {name:?}"),
        None if first.thread_id != 0 => format!("thread {}", first.thread_id),
        None => "another thread".to_owned(),
    };
    match holders.len() - 1 {
        0 => format!("waiting for the GIL (held by {thread})"),
        1 => format!("waiting for the GIL (held by {thread} and 1 other)"),
        others => format!("waiting for the GIL (held by {thread} and {others} others)"),
    }
}

/// The frame a wait that is not the code's is reported as, below the frames it interrupted, and
/// the report's kind.
pub fn waited_frame(
    cause: NotTheCode,
    gc_generation: Option<u8>,
    gc_ns: u64,
    holders: &[GilHolder],
    gil_ns: u64,
) -> (EpisodeKind, StackFrame) {
    let (kind, name, duration_ns) = match cause {
        NotTheCode::Gc => (EpisodeKind::Gc, gc_culprit_name(gc_generation), gc_ns),
        NotTheCode::Gil => (EpisodeKind::Gil, gil_culprit_name(holders), gil_ns),
    };
    let frame = StackFrame {
        name,
        filename: None,
        lineno: None,
        end_lineno: None,
        duration_ns,
        is_c_call: false,
        is_coroutine: false,
        included: true,
    };
    (kind, frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look(at: Ticks, cpu_ns: u64, cpu_wait_ns: u64, doing: Doing) -> GilLook {
        GilLook {
            at,
            cpu_ns,
            cpu_wait_ns,
            doing,
        }
    }

    const GIL: Doing = Doing::Gil { holder: 7 };

    #[test]
    fn a_stretch_is_a_wait_for_the_gil_only_next_to_one_seen_and_no_other_sleep() {
        // 1 ms apart (1 tick = 1 ns), of which 300 µs ran and 100 µs waited for a CPU.
        let a = |seen| look(1_000_000, 5_000_000, 10, seen);
        let b = |seen| look(2_000_000, 5_300_000, 100_010, seen);
        assert_eq!(
            waited_between(&a(Doing::Running), &b(GIL), 1.0),
            Some((600_000, 7))
        );
        assert_eq!(
            waited_between(&a(GIL), &b(Doing::Running), 1.0),
            Some((600_000, 7))
        );
        assert_eq!(
            waited_between(&a(GIL), &b(Doing::Gil { holder: 9 }), 1.0),
            Some((600_000, 7))
        );
        assert_eq!(
            waited_between(&a(Doing::Gil { holder: 0 }), &b(GIL), 1.0),
            Some((600_000, 7))
        );
        // A sleep of another kind at either end: the stretch may be that sleep, the code's.
        assert_eq!(waited_between(&a(GIL), &b(Doing::Sleeping), 1.0), None);
        assert_eq!(waited_between(&a(Doing::Sleeping), &b(GIL), 1.0), None);
        assert_eq!(
            waited_between(&a(Doing::Running), &b(Doing::Running), 1.0),
            None
        );
        // It ran the whole time: no wait, whatever was seen.
        let busy = look(2_000_000, 6_000_000, 10, Doing::Running);
        assert_eq!(waited_between(&a(GIL), &busy, 1.0), None);
    }

    #[test]
    fn waits_that_go_on_with_one_holder_make_one() {
        let mut log = GilLog::new();
        let wait = |start, end, holder| GilWait {
            start,
            end,
            waited: end - start,
            holder,
            holder_running: None,
        };
        log.add(wait(0, 10, 1));
        log.add(wait(10, 20, 1));
        log.add(wait(20, 30, 2));
        log.add(wait(40, 45, 2));
        assert_eq!(log.waits.len(), 3);
        let all = log.within(0, 100);
        assert_eq!(all.ticks, 35);
        assert_eq!(
            all.holders
                .iter()
                .map(|h| (h.ident, h.ticks))
                .collect::<Vec<_>>(),
            vec![(1, 20), (2, 15)]
        );
        // Half of the first wait (0 to 20, merged) lies inside: half of its time counts.
        assert_eq!(log.within(10, 20).ticks, 10);
        assert_eq!(log.within(50, 100), GilTime::default());
        log.clear();
        assert_eq!(log.within(0, 100), GilTime::default());
    }

    #[test]
    fn only_the_latest_waits_are_kept() {
        let mut log = GilLog::new();
        for n in 0..(GIL_LOG_CAPACITY as u64 + 10) {
            log.add(GilWait {
                start: n * 10,
                end: n * 10 + 1,
                waited: 1,
                holder: 1,
                holder_running: None,
            });
        }
        assert_eq!(log.within(0, u64::MAX).ticks, GIL_LOG_CAPACITY as u64);
    }

    #[test]
    fn the_code_is_blamed_unless_the_waits_put_it_over_the_threshold() {
        let ms = 1_000_000;
        assert_eq!(not_the_code(30 * ms, 0, 0, 0, 20 * ms), None);
        assert_eq!(
            not_the_code(30 * ms, 0, 0, 25 * ms, 20 * ms),
            Some(NotTheCode::Gil)
        );
        assert_eq!(
            not_the_code(30 * ms, 0, 8 * ms, 5 * ms, 20 * ms),
            Some(NotTheCode::Gc)
        );
        // Over the threshold even without the waits: the code's.
        assert_eq!(not_the_code(50 * ms, 0, 0, 25 * ms, 20 * ms), None);
        // Starved: judged as such, not here.
        assert_eq!(not_the_code(30 * ms, 15 * ms, 0, 10 * ms, 20 * ms), None);
    }

    #[test]
    fn the_culprit_names_the_holders_longest_first() {
        let time = GilTime {
            ticks: 3,
            holders: vec![
                HeldBy {
                    ident: 5,
                    ticks: 2,
                    running: Some("spin (worker.py:12)".into()),
                },
                HeldBy {
                    ident: 6,
                    ticks: 1,
                    running: None,
                },
            ],
        };
        let holders = gil_holders(&time, &[Some("cpu-1".into()), None], 1e6);
        assert_eq!(holders[0].wait_ns, 2_000_000);
        assert_eq!(
            gil_culprit_name(&holders),
            "waiting for the GIL (held by thread \"cpu-1\" and 1 other)"
        );
        assert_eq!(
            gil_culprit_name(&holders[1..]),
            "waiting for the GIL (held by thread 6)"
        );
        assert_eq!(gil_culprit_name(&[]), "waiting for the GIL");
    }
}
