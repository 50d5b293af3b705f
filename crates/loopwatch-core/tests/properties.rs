//! Arbitrary, even nonsensical, event sequences: the tracker never panics, never reports a stall
//! longer than the time that passed, never reports anything when every gap is short, and its hot
//! path decides exactly what the general path would.

mod sim;

use loopwatch_core::Tag;
use proptest::prelude::*;
use sim::*;

#[derive(Clone, Debug)]
enum Event {
    Call(u64, u8),
    CCall(u64),
    Return(u64),
    CReturn(u64),
    Advance(u64),
    Flush,
}

fn event(max_advance: u64) -> impl Strategy<Value = Event> {
    prop_oneof![
        (1u64..16, 0u8..8).prop_map(|(k, t)| Event::Call(k, t)),
        (1u64..16).prop_map(Event::CCall),
        (1u64..16).prop_map(Event::Return),
        (1u64..16).prop_map(Event::CReturn),
        (0..max_advance).prop_map(Event::Advance),
        Just(Event::Flush),
    ]
}

fn run(events: &[Event], loop_running: bool) -> Sim {
    run_on(Sim::new(), events, loop_running)
}

fn run_on(mut s: Sim, events: &[Event], loop_running: bool) -> Sim {
    s.py.loop_running = loop_running;
    for e in events {
        match *e {
            Event::Call(k, t) => s.call(k, Tag::from_bits(t)),
            Event::CCall(k) => s.c_call(k, Tag::PLAIN),
            Event::Return(k) => s.ret(k),
            Event::CReturn(k) => s.c_ret(k),
            Event::Advance(t) => s.advance(t),
            Event::Flush => s.flush(),
        };
    }
    s
}

/// The episodes with their ids replaced by the order in which each id first appears.
fn renumbered(episodes: &[loopwatch_core::Episode]) -> Vec<loopwatch_core::Episode> {
    let mut ids: Vec<u64> = Vec::new();
    episodes
        .iter()
        .map(|episode| {
            let id = ids
                .iter()
                .position(|&id| id == episode.episode_id)
                .unwrap_or_else(|| {
                    ids.push(episode.episode_id);
                    ids.len() - 1
                });
            loopwatch_core::Episode {
                episode_id: id as u64,
                ..episode.clone()
            }
        })
        .collect()
}

proptest! {
    #[test]
    fn episodes_are_bounded_by_elapsed_time(events in prop::collection::vec(event(40), 0..200), running: bool) {
        let s = run(&events, running);
        for e in &s.episodes {
            prop_assert!(e.duration_ns <= s.now);
            prop_assert!(e.duration_ns >= THRESHOLD);
            prop_assert!(e.culprit < e.stack.len());
            for frame in &e.stack {
                prop_assert!(frame.duration_ns <= e.duration_ns);
            }
        }
    }

    #[test]
    fn the_hot_path_decides_exactly_as_the_general_path(events in prop::collection::vec(event(40), 0..200), running: bool) {
        let mut general = Sim::new();
        general.general_only = true;
        let general = run_on(general, &events, running);
        let hot = run(&events, running);
        // Each run numbers its units afresh: compared by which reports share a unit.
        prop_assert_eq!(renumbered(&hot.episodes), renumbered(&general.episodes));
        prop_assert_eq!(hot.tracker.depth(), general.tracker.depth());
    }

    #[test]
    fn short_gaps_never_report(events in prop::collection::vec(event(1), 0..(THRESHOLD as usize - 1)), running: bool) {
        let s = run(&events, running);
        prop_assert!(s.episodes.is_empty());
    }
}
