//! The recording reader on anything a disk can hold: arbitrary bytes, and real recordings cut,
//! flipped and spliced. It never panics, never reads past what it was given, and whatever it
//! reads before the first damage is exactly what was written. (`fuzz/` runs the same reader under
//! libFuzzer for longer.)

use std::collections::BTreeMap;

use loopwatch_core::recording::{
    encode, Damage, Record, RecordReader, RecordedEpisode, RecordedFrame, SessionRecord, FILE_START,
};
use loopwatch_core::EpisodeKind;
use proptest::prelude::*;

fn frame() -> impl Strategy<Value = RecordedFrame> {
    (
        "[a-z_.]{1,30}",
        proptest::option::of("/[a-z/]{1,40}\\.py"),
        proptest::option::of(1u32..100_000),
        0.0f64..1e6,
        any::<bool>(),
        proptest::option::of(any::<bool>()),
    )
        .prop_map(
            |(name, filename, lineno, duration_ms, is_c_call, user_code)| RecordedFrame {
                name,
                filename,
                lineno,
                end_lineno: None,
                duration_ms,
                is_c_call,
                is_coroutine: !is_c_call,
                included: true,
                user_code,
            },
        )
}

fn record() -> impl Strategy<Value = Record> {
    let episode = (
        "[a-z_.]{1,30}",
        0.0f64..1e6,
        proptest::collection::vec(frame(), 0..12),
        proptest::collection::btree_map("[a-z_]{1,10}", "\\PC{0,20}", 0..3),
        prop_oneof![
            Just(EpisodeKind::Call),
            Just(EpisodeKind::Callback),
            Just(EpisodeKind::Step),
            Just(EpisodeKind::Gc)
        ],
    )
        .prop_map(|(method_name, duration_ms, stack, context, kind)| {
            let reports_while_running = (duration_ms as u32) % 3;
            let culprits_in_episode = 1 + (duration_ms as u32) % 2;
            Record::Episode(Box::new(RecordedEpisode {
                timestamp: 1.7e9,
                process_id: 1,
                thread_id: 2,
                kind,
                method_name,
                duration_ms,
                culprit_duration_ms: duration_ms / 2.0,
                threshold_ms: 10.0,
                cpu_wait_ms: 0.0,
                gc_ms: 0.0,
                gil_wait_ms: 0.0,
                is_c_call: false,
                filename: None,
                lineno: Some(3),
                end_lineno: None,
                task_name: Some("Task-1".into()),
                context: context.into_iter().collect::<BTreeMap<_, _>>(),
                stack,
                reports_while_running,
                episode_id: u64::from(reports_while_running),
                culprits_in_episode,
                share_ms: (culprits_in_episode > 1).then_some(duration_ms / 3.0),
            }))
        });
    let session = (
        1u32..1_000_000,
        proptest::collection::vec("\\PC{0,20}", 0..4),
    )
        .prop_map(|(process_id, argv)| {
            Record::Session(SessionRecord {
                process_id,
                argv,
                started_at: 1.7e9,
                python_version: "3.12.1".into(),
                loopwatch_version: "0.1.0".into(),
            })
        });
    prop_oneof![1 => session, 4 => episode]
}

fn recording(records: &[Record]) -> Vec<u8> {
    let mut bytes = FILE_START.to_vec();
    for record in records {
        bytes.extend(encode(record));
    }
    bytes
}

/// Reads everything; checks that the reader stops after damage it cannot read past.
fn read(bytes: &[u8]) -> Vec<Result<Record, Damage>> {
    let Ok(reader) = RecordReader::new(bytes) else {
        return Vec::new();
    };
    let items: Vec<_> = reader.take(100_000).collect();
    for (i, item) in items.iter().enumerate() {
        if let Err(damage) = item {
            assert!(damage.offset() <= bytes.len() as u64);
            if !matches!(damage, Damage::BadRecord { .. }) {
                assert_eq!(i, items.len() - 1, "the reader went on after {damage}");
            }
        }
    }
    items
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut bytes = FILE_START.to_vec();
        bytes.extend(tail);
        read(&bytes);
    }

    #[test]
    fn whole_records_read_back_exactly(records in proptest::collection::vec(record(), 0..8)) {
        let read: Vec<_> = read(&recording(&records)).into_iter().map(Result::unwrap).collect();
        prop_assert_eq!(read, records);
    }

    #[test]
    fn a_cut_file_reads_every_record_before_the_cut(
        records in proptest::collection::vec(record(), 1..6),
        cut_at in any::<prop::sample::Index>(),
    ) {
        let bytes = recording(&records);
        let cut = FILE_START.len() + cut_at.index(bytes.len() - FILE_START.len());
        let read = read(&bytes[..cut]);
        let whole: Vec<_> = read.iter().filter_map(|r| r.as_ref().ok()).cloned().collect();
        prop_assert_eq!(&whole[..], &records[..whole.len()]);
        let mut end = FILE_START.len();
        for record in &records[..whole.len()] {
            end += encode(record).len();
        }
        if end == cut {
            prop_assert_eq!(read.len(), whole.len());
        } else {
            prop_assert_eq!(read.last(), Some(&Err(Damage::CutShort { offset: end as u64 })));
        }
    }

    #[test]
    fn flipped_and_spliced_bytes_never_panic(
        records in proptest::collection::vec(record(), 1..6),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..10),
    ) {
        let mut bytes = recording(&records);
        let mut untouched = bytes.len();
        for (at, byte, how) in edits {
            let at = at.index(bytes.len());
            untouched = untouched.min(at);
            match how {
                0 => bytes[at] = byte,
                1 => { bytes.insert(at, byte); }
                _ => { bytes.remove(at); }
            }
        }
        let read = read(&bytes);
        // Every record that ends before the first edit reads back as it was written.
        let mut end = FILE_START.len();
        for (i, record) in records.iter().enumerate() {
            end += encode(record).len();
            if end > untouched {
                break;
            }
            prop_assert_eq!(read.get(i), Some(&Ok(record.clone())));
        }
    }
}
