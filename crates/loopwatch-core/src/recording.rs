//! The recording format: every reported episode of a session, for later analysis.
//!
//! A recording is a MessagePack stream. It opens with the string `"loopwatch-recording"` and the
//! format version (an integer), so a foreign file is told apart at once. Each record follows as a
//! MessagePack `bin` whose bytes are the record itself, a map with a `"type"` key: a length-prefixed
//! frame lets a reader skip a record it cannot decode, and bound what it allocates. A writer hands
//! each frame to the OS in one write, so a program killed at any moment leaves whole records; a file
//! cut inside a record (a full disk, a lost machine) still reads up to its last complete one.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::EpisodeKind;

/// The fixed start of every recording: a MessagePack str of 19 bytes, then the version.
pub const FILE_START: &[u8] = b"\xb3loopwatch-recording\x01";
pub const FORMAT_VERSION: u8 = 1;
/// No record is larger: a frame claiming more is damage, not a record to allocate for.
pub const MAX_RECORD_BYTES: u32 = 16 << 20;

const BIN8: u8 = 0xc4;
const BIN16: u8 = 0xc5;
const BIN32: u8 = 0xc6;

/// Who wrote the records that follow it: one per process that records into the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub process_id: u32,
    #[serde(default)]
    pub argv: Vec<String>,
    /// Seconds since the epoch.
    pub started_at: f64,
    #[serde(default)]
    pub python_version: String,
    #[serde(default)]
    pub loopwatch_version: String,
}

/// One frame of a recorded episode's stack, outermost first, as a report shows it.
#[allow(clippy::struct_excessive_bools)] // independent facts about one frame
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedFrame {
    pub name: String,
    pub filename: Option<String>,
    pub lineno: Option<u32>,
    pub end_lineno: Option<u32>,
    pub duration_ms: f64,
    #[serde(default)]
    pub is_c_call: bool,
    #[serde(default)]
    pub is_coroutine: bool,
    #[serde(default = "yes")]
    pub included: bool,
    /// Whether the recording process took this frame for the user's own code; absent in
    /// recordings of loopwatch 0.1.0, whose readers decide it from the file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_code: Option<bool>,
}

fn yes() -> bool {
    true
}

/// One reported episode, in the units and words of the report users get (`BlockingCallInfo`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedEpisode {
    /// When the episode started, in seconds since the epoch.
    pub timestamp: f64,
    pub process_id: u32,
    pub thread_id: u64,
    pub kind: EpisodeKind,
    /// The culprit, module-qualified.
    pub method_name: String,
    pub duration_ms: f64,
    pub culprit_duration_ms: f64,
    pub threshold_ms: f64,
    #[serde(default)]
    pub cpu_wait_ms: f64,
    /// Of `duration_ms`, the loop's thread's garbage collections; absent (0) in recordings of
    /// loopwatch before it timed them.
    #[serde(default)]
    pub gc_ms: f64,
    /// Of `duration_ms`, how long the loop's thread waited for the GIL; absent (0) in recordings
    /// of loopwatch before it measured those waits, and when there were none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gil_wait_ms: f64,
    #[serde(default)]
    pub is_c_call: bool,
    pub filename: Option<String>,
    pub lineno: Option<u32>,
    pub end_lineno: Option<u32>,
    pub task_name: Option<String>,
    /// What the monitoring scope said about itself: a request's method, path and id.
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    pub stack: Vec<RecordedFrame>,
    /// How many times the stall was reported while it still ran; absent (0) in recordings of
    /// loopwatch before it reported stalls while they ran.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reports_while_running: u32,
    /// The reports of one callback or step share it (with the process id): absent (0) in
    /// recordings of loopwatch before a step could have several culprits, each report its own.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub episode_id: u64,
    /// How many reports the step made; absent (1) as above.
    #[serde(default = "crate::episode::one", skip_serializing_if = "is_one")]
    pub culprits_in_episode: u32,
    /// Of `duration_ms`, the part this report's culprit accounts for; absent (all of it) as above.
    #[serde(default)]
    pub share_ms: Option<f64>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
fn is_one(value: &u32) -> bool {
    *value == 1
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
fn is_zero<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
fn is_false(value: &bool) -> bool {
    !*value
}

impl RecordedEpisode {
    /// Whether the numbers can be what a monitor measured: a decoded record that says otherwise
    /// is damage, not a report.
    fn problem(&self) -> Option<&'static str> {
        let times = [
            self.duration_ms,
            self.culprit_duration_ms,
            self.threshold_ms,
            self.cpu_wait_ms,
            self.gc_ms,
            self.gil_wait_ms,
            self.share_ms.unwrap_or(0.0),
        ];
        if !self.timestamp.is_finite() || times.iter().any(|t| !t.is_finite() || *t < 0.0) {
            return Some("a time that is negative or not a number");
        }
        if self
            .stack
            .iter()
            .any(|f| !f.duration_ms.is_finite() || f.duration_ms < 0.0)
        {
            return Some("a frame time that is negative or not a number");
        }
        None
    }
}

/// One frame of a stack read while a stall still ran, innermost first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedSample {
    pub filename: String,
    pub function: String,
    pub lineno: Option<u32>,
}

/// A stall reported while it still ran, written by the watchdog itself (no Python): a step that
/// never ends (a hang, a process killed while blocked) is in the recording all the same. Its
/// episode, if it ends, follows it in the file with `reports_while_running` set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedStall {
    /// When the stall started, in seconds since the epoch.
    pub timestamp: f64,
    pub process_id: u32,
    /// The thread as Python names it (`threading.get_ident()`) and its name.
    pub thread_id: u64,
    pub thread_name: String,
    /// How long it had run when reported.
    pub so_far_ms: f64,
    pub threshold_ms: f64,
    /// 1 for its first report, then 2, 3...
    pub number: u32,
    /// The loop thread's Python stack, innermost first; empty if it could not be read.
    pub stack: Vec<RecordedSample>,
    /// Read while the thread ran a garbage collection; absent (false) in recordings of
    /// loopwatch before it said so.
    #[serde(default, skip_serializing_if = "is_false")]
    pub in_gc: bool,
}

impl RecordedStall {
    fn problem(&self) -> Option<&'static str> {
        let times = [self.timestamp, self.so_far_ms, self.threshold_ms];
        if times.iter().any(|t| !t.is_finite() || *t < 0.0) {
            return Some("a time that is negative or not a number");
        }
        None
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Record {
    Session(SessionRecord),
    Episode(Box<RecordedEpisode>),
    Stall(Box<RecordedStall>),
    /// A record of a kind this version does not know (written by a newer loopwatch): skipped.
    #[serde(other)]
    Unknown,
}

/// One record framed for the file: a MessagePack `bin` holding the record. Written in one call.
pub fn encode(record: &Record) -> Vec<u8> {
    let payload = rmp_serde::to_vec_named(record).expect("records serialize to plain maps");
    let mut frame = Vec::with_capacity(payload.len() + 5);
    frame.push(BIN32);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// Appends one record to a recording opened for appending, in one write where the OS allows.
/// A record written in part (a full disk) is cut back off, so that it cannot hide the records
/// written after it.
pub fn append(file: &mut std::fs::File, record: &Record) -> io::Result<()> {
    use std::io::Write;
    let frame = encode(record);
    let mut written = 0;
    while written < frame.len() {
        match file.write(&frame[written..]) {
            Ok(0) => return Err(undo_partial(file, written, io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(undo_partial(file, written, e)),
        }
    }
    Ok(())
}

fn undo_partial(file: &mut std::fs::File, written: usize, error: io::Error) -> io::Error {
    use std::io::Seek;
    if written > 0 {
        if let (Ok(end), Ok(meta)) = (file.stream_position(), file.metadata()) {
            if meta.len() == end {
                let _ = file.set_len(end - written as u64);
            }
        }
    }
    error
}

/// Why a file cannot be read as a recording at all.
#[derive(Debug)]
pub enum OpenError {
    NotARecording,
    /// A recording of a format version this loopwatch does not read.
    NewerVersion(u8),
    Io(io::Error),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::NotARecording => f.write_str("not a loopwatch recording"),
            OpenError::NewerVersion(v) => write!(
                f,
                "a recording of format version {v}, newer than this loopwatch reads ({FORMAT_VERSION}): upgrade loopwatch"
            ),
            OpenError::Io(e) => write!(f, "cannot read it: {e}"),
        }
    }
}

impl std::error::Error for OpenError {}

/// What went wrong at one place in a recording. The reader stops after all but `BadRecord`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The file ends inside a record: it was cut short while being written.
    CutShort { offset: u64 },
    /// Bytes that are not a record frame: what follows cannot be found.
    BadFrame { offset: u64 },
    /// A whole frame whose content is no record: skipped, the next one is read.
    BadRecord { offset: u64, reason: String },
    /// The OS failed to read the file.
    Unreadable { offset: u64, reason: String },
}

impl Damage {
    pub fn offset(&self) -> u64 {
        match self {
            Damage::CutShort { offset }
            | Damage::BadFrame { offset }
            | Damage::BadRecord { offset, .. }
            | Damage::Unreadable { offset, .. } => *offset,
        }
    }
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::CutShort { offset } => {
                write!(f, "cut short inside the record at byte {offset}")
            }
            Damage::BadFrame { offset } => {
                write!(f, "damaged at byte {offset}: no record starts there")
            }
            Damage::BadRecord { offset, reason } => {
                write!(f, "the record at byte {offset} is damaged ({reason})")
            }
            Damage::Unreadable { offset, reason } => {
                write!(f, "reading stopped at byte {offset}: {reason}")
            }
        }
    }
}

/// Reads records one at a time; ends at the file's end or at damage it cannot read past.
pub struct RecordReader<R: Read> {
    input: R,
    offset: u64,
    finished: bool,
}

impl<R: Read> RecordReader<R> {
    /// Checks the start of the file; the records follow.
    pub fn new(mut input: R) -> Result<Self, OpenError> {
        let mut start = [0u8; FILE_START.len()];
        let got = read_up_to(&mut input, &mut start).map_err(OpenError::Io)?;
        let name_len = FILE_START.len() - 1;
        if got < name_len || start[..name_len] != FILE_START[..name_len] {
            return Err(OpenError::NotARecording);
        }
        if got == name_len {
            return Err(OpenError::NotARecording);
        }
        let version = start[name_len];
        if version != FORMAT_VERSION {
            // Positive fixints only: anything else after the name is not a version.
            return Err(if version <= 0x7f {
                OpenError::NewerVersion(version)
            } else {
                OpenError::NotARecording
            });
        }
        Ok(Self {
            input,
            offset: FILE_START.len() as u64,
            finished: false,
        })
    }

    /// Bytes read so far: for progress, and where damage was found.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn read_frame(&mut self) -> Option<Result<Vec<u8>, Damage>> {
        let at = self.offset;
        let mut marker = [0u8; 1];
        match read_up_to(&mut self.input, &mut marker) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some(Err(unreadable(at, &e))),
        }
        let width = match marker[0] {
            BIN8 => 1,
            BIN16 => 2,
            BIN32 => 4,
            _ => return Some(Err(Damage::BadFrame { offset: at })),
        };
        let mut length = [0u8; 4];
        match read_up_to(&mut self.input, &mut length[4 - width..]) {
            Ok(n) if n == width => {}
            Ok(_) => return Some(Err(Damage::CutShort { offset: at })),
            Err(e) => return Some(Err(unreadable(at, &e))),
        }
        let length = u32::from_be_bytes(length);
        if length > MAX_RECORD_BYTES {
            return Some(Err(Damage::BadFrame { offset: at }));
        }
        // Grows as bytes arrive: a frame that claims more than the file holds costs nothing.
        let mut payload = Vec::new();
        match (&mut self.input)
            .take(u64::from(length))
            .read_to_end(&mut payload)
        {
            Ok(n) if n == length as usize => {}
            Ok(_) => return Some(Err(Damage::CutShort { offset: at })),
            Err(e) => return Some(Err(unreadable(at, &e))),
        }
        self.offset += 1 + width as u64 + u64::from(length);
        Some(Ok(payload))
    }
}

impl<R: Read> Iterator for RecordReader<R> {
    type Item = Result<Record, Damage>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let at = self.offset;
        match self.read_frame() {
            None => {
                self.finished = true;
                None
            }
            Some(Err(damage)) => {
                self.finished = true;
                Some(Err(damage))
            }
            Some(Ok(payload)) => {
                Some(decode(&payload).map_err(|reason| Damage::BadRecord { offset: at, reason }))
            }
        }
    }
}

fn decode(payload: &[u8]) -> Result<Record, String> {
    let record: Record = rmp_serde::from_slice(payload).map_err(|e| e.to_string())?;
    let problem = match &record {
        Record::Episode(episode) => episode.problem(),
        Record::Stall(stall) => stall.problem(),
        Record::Session(_) | Record::Unknown => None,
    };
    match problem {
        Some(problem) => Err(problem.to_owned()),
        None => Ok(record),
    }
}

fn unreadable(offset: u64, error: &io::Error) -> Damage {
    Damage::Unreadable {
        offset,
        reason: error.to_string(),
    }
}

/// Fills `buf` as far as the input goes; the count is short only at the end of the input.
fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Whether `start` (the first bytes of a file) begins a recording this version can add to.
pub fn starts_recording(start: &[u8]) -> bool {
    start.starts_with(FILE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn episode(name: &str, duration_ms: f64) -> Record {
        Record::Episode(Box::new(RecordedEpisode {
            timestamp: 1_700_000_000.5,
            process_id: 42,
            thread_id: 7,
            kind: EpisodeKind::Call,
            method_name: name.to_owned(),
            duration_ms,
            culprit_duration_ms: duration_ms,
            threshold_ms: 10.0,
            cpu_wait_ms: 0.0,
            gc_ms: 0.0,
            gil_wait_ms: 0.0,
            is_c_call: true,
            filename: Some("/app/main.py".to_owned()),
            lineno: Some(12),
            end_lineno: None,
            task_name: Some("Task-1".to_owned()),
            context: BTreeMap::from([("request_id".to_owned(), "r1".to_owned())]),
            reports_while_running: 0,
            episode_id: 0,
            culprits_in_episode: 1,
            share_ms: None,
            stack: vec![RecordedFrame {
                name: name.to_owned(),
                filename: None,
                lineno: None,
                end_lineno: None,
                duration_ms,
                is_c_call: true,
                is_coroutine: false,
                included: true,
                user_code: Some(false),
            }],
        }))
    }

    fn file(records: &[Record]) -> Vec<u8> {
        let mut bytes = FILE_START.to_vec();
        for record in records {
            bytes.extend(encode(record));
        }
        bytes
    }

    fn read_all(bytes: &[u8]) -> Vec<Result<Record, Damage>> {
        RecordReader::new(bytes).unwrap().collect()
    }

    #[test]
    fn records_read_back_as_written() {
        let records = vec![
            Record::Session(SessionRecord {
                process_id: 42,
                argv: vec!["app.py".into()],
                started_at: 1.5,
                python_version: "3.12.1".into(),
                loopwatch_version: "0.1.0".into(),
            }),
            episode("time.sleep", 101.5),
            episode("json.dumps", 12.25),
        ];
        let read: Vec<_> = read_all(&file(&records))
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(read, records);
    }

    #[test]
    fn a_file_cut_inside_a_record_reads_up_to_the_last_whole_one() {
        let bytes = file(&[episode("a", 20.0), episode("b", 30.0)]);
        let second = FILE_START.len() + encode(&episode("a", 20.0)).len();
        for cut in second + 1..bytes.len() {
            let read = read_all(&bytes[..cut]);
            assert_eq!(read.len(), 2, "cut at {cut}");
            assert_eq!(read[0], Ok(episode("a", 20.0)));
            assert_eq!(
                read[1],
                Err(Damage::CutShort {
                    offset: second as u64
                })
            );
        }
        assert_eq!(read_all(&bytes[..second]), vec![Ok(episode("a", 20.0))]);
    }

    #[test]
    fn a_damaged_record_is_skipped_and_the_next_one_read() {
        let first = encode(&episode("a", 20.0));
        let mut bytes = FILE_START.to_vec();
        bytes.extend(&first[..5]);
        bytes.extend(std::iter::repeat_n(0xc1, first.len() - 5)); // 0xc1 is never valid
        bytes.extend(encode(&episode("b", 30.0)));
        let read = read_all(&bytes);
        assert!(
            matches!(read[0], Err(Damage::BadRecord { offset, .. }) if offset == FILE_START.len() as u64)
        );
        assert_eq!(read[1], Ok(episode("b", 30.0)));
    }

    #[test]
    fn impossible_numbers_are_damage() {
        let bytes = file(&[
            episode("a", -1.0),
            episode("b", f64::NAN),
            episode("c", 5.0),
        ]);
        let read = read_all(&bytes);
        assert!(matches!(read[0], Err(Damage::BadRecord { .. })));
        assert!(matches!(read[1], Err(Damage::BadRecord { .. })));
        assert_eq!(read[2], Ok(episode("c", 5.0)));
    }

    #[test]
    fn garbage_between_records_stops_the_reader() {
        let mut bytes = file(&[episode("a", 20.0)]);
        let at = bytes.len() as u64;
        bytes.extend(b"garbage");
        bytes.extend(encode(&episode("b", 30.0)));
        let read = read_all(&bytes);
        assert_eq!(
            read,
            vec![Ok(episode("a", 20.0)), Err(Damage::BadFrame { offset: at })]
        );
    }

    #[test]
    fn a_frame_claiming_too_much_is_damage_not_an_allocation() {
        let mut bytes = FILE_START.to_vec();
        bytes.push(BIN32);
        bytes.extend(u32::MAX.to_be_bytes());
        let read = read_all(&bytes);
        assert!(matches!(read[..], [Err(Damage::BadFrame { .. })]));
        let mut bytes = FILE_START.to_vec();
        bytes.push(BIN32);
        bytes.extend(MAX_RECORD_BYTES.to_be_bytes());
        assert!(matches!(
            read_all(&bytes)[..],
            [Err(Damage::CutShort { .. })]
        ));
    }

    #[test]
    fn foreign_and_newer_files_are_told_apart() {
        for foreign in [
            &b""[..],
            b"PK\x03\x04 a zip file",
            b"\xb3loopwatch-recordin",
            b"\xb3loopwatch-recording",
        ] {
            assert!(matches!(
                RecordReader::new(foreign),
                Err(OpenError::NotARecording)
            ));
        }
        let mut newer = FILE_START.to_vec();
        *newer.last_mut().unwrap() = 2;
        assert!(matches!(
            RecordReader::new(&newer[..]),
            Err(OpenError::NewerVersion(2))
        ));
        assert!(starts_recording(&file(&[])));
        assert!(!starts_recording(b"{\"json\": 1}"));
    }

    #[test]
    fn unknown_record_types_from_newer_writers_are_skipped_over() {
        #[derive(Serialize)]
        struct Future {
            r#type: &'static str,
            anything: u32,
        }
        let payload = rmp_serde::to_vec_named(&Future {
            r#type: "heartbeat",
            anything: 1,
        })
        .unwrap();
        let mut bytes = FILE_START.to_vec();
        bytes.push(BIN32);
        bytes.extend((payload.len() as u32).to_be_bytes());
        bytes.extend(payload);
        bytes.extend(encode(&episode("a", 20.0)));
        assert_eq!(
            read_all(&bytes),
            vec![Ok(Record::Unknown), Ok(episode("a", 20.0))]
        );
    }

    #[test]
    fn a_frame_of_an_older_writer_has_no_word_on_user_code() {
        // loopwatch 0.1.0 wrote frames without `user_code`: they still read, with None.
        #[derive(Serialize)]
        struct OldFrame {
            name: &'static str,
            filename: Option<&'static str>,
            lineno: Option<u32>,
            end_lineno: Option<u32>,
            duration_ms: f64,
            is_c_call: bool,
            is_coroutine: bool,
            included: bool,
        }
        let old = rmp_serde::to_vec_named(&OldFrame {
            name: "app.work",
            filename: Some("/app/work.py"),
            lineno: Some(3),
            end_lineno: None,
            duration_ms: 20.0,
            is_c_call: false,
            is_coroutine: false,
            included: true,
        })
        .unwrap();
        let frame: RecordedFrame = rmp_serde::from_slice(&old).unwrap();
        assert_eq!((frame.name.as_str(), frame.user_code), ("app.work", None));
        let Record::Episode(written) = episode("a", 20.0) else {
            unreachable!()
        };
        let bytes = encode(&Record::Episode(written.clone()));
        let Some(Ok(Record::Episode(read))) = read_all(&[FILE_START, &bytes].concat()).pop() else {
            panic!("the episode did not read back")
        };
        assert_eq!(read.stack[0].user_code, Some(false));
    }
}
