//! Any bytes at all, read as a recording: no panic, no allocation beyond what the file holds
//! (libFuzzer's -rss_limit_mb catches that), and the reader stops after damage it cannot skip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loopwatch_core::recording::{Damage, RecordReader, FILE_START};

fn read(bytes: &[u8]) {
    let Ok(reader) = RecordReader::new(bytes) else {
        return;
    };
    let mut stopped = false;
    for item in reader {
        assert!(!stopped, "the reader went on after damage it cannot read past");
        if let Err(damage) = item {
            assert!(damage.offset() <= bytes.len() as u64);
            stopped = !matches!(damage, Damage::BadRecord { .. });
        }
    }
}

fuzz_target!(|data: &[u8]| {
    read(data);
    // Most inputs lack the file's start; read them behind one too, to reach the records.
    let mut bytes = FILE_START.to_vec();
    bytes.extend_from_slice(data);
    read(&bytes);
});
